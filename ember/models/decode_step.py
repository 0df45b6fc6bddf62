"""One C call per decode step for Llama-family models on ember's packed CPU kernels (kernels/csrc/decode_step.c).

Taken when every sequence of the step decodes one token and every linear of the body is packed without a
bias; anything else (prefill, mixed steps, other formats) runs the per-op path, which computes the same
numbers with the same kernels. EMBER_FUSED=0 turns it off.
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch import nn

from ember.kernels import cpu_ops
from ember.layers.attention import ForwardContext
from ember.quant import packed

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class _Linear(ctypes.Structure):
    _fields_ = [("codes", _P), ("s16", _P), ("o16", _P), ("mode", _I)]


class _Layer(ctypes.Structure):
    _fields_ = [("in_norm", _P), ("post_norm", _P), ("q_norm", _P), ("k_norm", _P), ("qkv", _Linear),
                ("o", _Linear), ("gate_up", _Linear), ("down", _Linear), ("kc", _P), ("vc", _P)]


class _Dims(ctypes.Structure):
    _fields_ = [(n, _I) for n in ("layers", "d", "nq", "nkv", "dh", "inter", "half", "s_slots", "window",
                                  "amx_rows")] + [("eps", _F), ("qk_eps", _F), ("scale", _F)]


def _lin(m: nn.Module) -> _Linear:
    return _Linear(m.codes.data_ptr(), m.s16.data_ptr(), m.o16.data_ptr(), packed.mode(m))


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class DecodeStep:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._layers: ctypes.Array | None = None
        self._cache_key: tuple[int, ...] = ()

    @staticmethod
    def build(model: nn.Module) -> DecodeStep | None:
        """None unless the model qualifies (see the module docstring)."""
        if os.environ.get("EMBER_FUSED", "1") == "0" or cpu_ops() is None or not packed.available():
            return None
        for layer in model.layers:
            a, mlp = layer.self_attn, layer.mlp
            lins = (a.qkv_proj, a.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if not all(isinstance(m.method, packed.PackedBlocksMethod) and m.bias is None for m in lins):
                return None
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            if mlp.act != "silu" or any(n.out_dtype != torch.float32 for n in norms):
                return None
            if a.dh > 256 or a.h // a.hkv > 16:  # the decode attention kernel's limits
                return None
        return DecodeStep(model)

    def _layer_array(self, ctx: ForwardContext) -> ctypes.Array:
        key = tuple(t.data_ptr() for t in ctx.k_cache) + tuple(t.data_ptr() for t in ctx.v_cache)
        if self._layers is None or key != self._cache_key:
            rows = []
            for i, layer in enumerate(self.model.layers):
                a, mlp = layer.self_attn, layer.mlp
                rows.append(_Layer(layer.input_layernorm.weight.data_ptr(),
                                   layer.post_attention_layernorm.weight.data_ptr(),
                                   _ptr(a.q_norm.weight if a.q_norm is not None else None),
                                   _ptr(a.k_norm.weight if a.k_norm is not None else None),
                                   _lin(a.qkv_proj), _lin(a.o_proj), _lin(mlp.gate_up_proj), _lin(mlp.down_proj),
                                   ctx.k_cache[i].data_ptr(), ctx.v_cache[i].data_ptr()))
            self._layers, self._cache_key = (_Layer * len(rows))(*rows), key
        return self._layers

    def __call__(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: ForwardContext
                 ) -> torch.Tensor | None:
        """x: [T, D] fp32 embeddings -> final-normed hidden states [T, D] fp32, or None: take the per-op path."""
        t = x.shape[0]
        kc = ctx.k_cache[0]
        if (ctx.decode_slots is None or ctx.decode_rows is not None or len(ctx.seqs) != t
                or kc.dtype != torch.bfloat16 or not kc.is_contiguous()):
            return None  # not every sequence decodes, or a cache the kernels do not read
        m, a = self.model, self.model.layers[0].self_attn
        dims = _Dims(len(m.layers), x.shape[1], a.h, a.hkv, a.dh, m.layers[0].mlp.inter, rope[0].shape[-1],
                     kc.shape[1], 0, packed.MAX_GEMV_ROWS if packed.amx_available() else 1 << 62,
                     m.norm.eps, a.q_norm.eps if a.q_norm is not None else 1e-6, a.scale)
        cos, sin = rope[0].contiguous(), rope[1].contiguous()
        x = x.contiguous()
        out = torch.empty_like(x)
        slots, lens = ctx.decode_slots.contiguous(), ctx.decode_lens.contiguous()
        cpu_ops().ember_llama_decode(  # type: ignore[union-attr]
            self._layer_array(ctx), ctypes.byref(dims), x.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            ctx.slot_mapping.data_ptr(), slots.data_ptr(), lens.data_ptr(), slots.shape[1], t,
            m.norm.weight.data_ptr(), out.data_ptr())
        return out
