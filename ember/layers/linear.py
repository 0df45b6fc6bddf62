"""Linear layer whose weights are loaded shard by shard and packed by a QuantMethod."""

from __future__ import annotations

import torch
from torch import nn

from ember.quant.base import QuantMethod, QuantSpec, select_method
from ember.weights.base import RawTensor

# checkpoint module name -> (fused ember module, shard) for the usual q/k/v and gate/up fusions
QKV_GATE_UP = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
               "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up")}


class Linear(nn.Module):
    """y = x W^T (+ b), with W possibly fused from several checkpoint tensors (q/k/v, gate/up).

    `shards` names the parts in output order, e.g. ("q", "k", "v"); a plain linear has one unnamed
    shard. Parts arrive through `load()` in any order; `finalize()` packs them with a QuantMethod.
    """

    def __init__(self, in_features: int, out_features: list[int] | int, bias: bool = False,
                 shards: tuple[str, ...] = ("",)) -> None:
        super().__init__()
        outs = [out_features] if isinstance(out_features, int) else list(out_features)
        assert len(outs) == len(shards)
        self.in_features, self.out_sizes, self.shard_names = in_features, outs, shards
        self.has_bias = bias
        self.method: QuantMethod | None = None
        self._pending: dict[str, RawTensor] = {}
        self._pending_bias: dict[str, RawTensor] = {}

    def load(self, shard: str, tensor: RawTensor, is_bias: bool = False) -> None:
        if shard not in self.shard_names:
            raise KeyError(f"unknown shard {shard!r} for {self.shard_names}")
        expect = (self.out_sizes[self.shard_names.index(shard)],) + (() if is_bias else (self.in_features,))
        if tuple(tensor.shape) != expect:
            raise ValueError(f"{tensor.name}: shape {tuple(tensor.shape)} does not match the model's {expect}")
        (self._pending_bias if is_bias else self._pending)[shard] = tensor

    @property
    def block_weights(self) -> int:
        """How many of the pending weights are GGUF blocks (for the loader's layout rule)."""
        from ember.quant.gguf_blocks import DECODERS

        return sum(int(t.shape[0]) * int(t.shape[1]) for t in self._pending.values()
                   if t.kind in DECODERS and len(t.shape) == 2)

    @property
    def missing(self) -> list[str]:
        miss = [s for s in self.shard_names if s not in self._pending]
        if self.has_bias:
            miss += [f"{s} (bias)" for s in self.shard_names if s not in self._pending_bias]
        return miss

    def finalize(self, dtype: torch.dtype, device: torch.device, quantize: QuantSpec | None = None,
                 compact: bool = True) -> None:
        shards = [self._pending[s] for s in self.shard_names]
        bias = None
        if self.has_bias:
            bias = torch.cat([self._pending_bias[s].dequantize() for s in self.shard_names])
        self.method = select_method(shards, dtype, device, quantize, compact)
        self.method.pack(self, shards, bias, dtype, device)
        for t in shards:
            t.release()
        self._pending.clear()
        self._pending_bias.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)  # type: ignore[union-attr]

    def extra_repr(self) -> str:
        m = self.method.name if self.method else "unloaded"
        return f"in={self.in_features}, out={self.out_sizes}, method={m}"
