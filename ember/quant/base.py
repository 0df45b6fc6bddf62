"""The QuantMethod seam: every linear layer packs its weights once at load and applies them per call.

A method is chosen from what the checkpoint says about each weight (its `kind`), never from a file
name. Later methods (int4 blocks, GPTQ/AWQ, int8, NF4) plug in by registering here; model code
never changes per format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from ember.weights.base import RawTensor


class QuantMethod(ABC):
    """Packs shards of a (possibly fused) linear weight into buffers on the layer; applies them."""

    name: str = "?"

    @abstractmethod
    def pack(self, layer: nn.Module, shards: list[RawTensor], bias: torch.Tensor | None,
             dtype: torch.dtype, device: torch.device) -> None: ...

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor: ...


class DenseMethod(QuantMethod):
    """Dequantize to `dtype` and run a plain matmul (the reference path; any kind gguf-py reads)."""

    name = "dense"

    def pack(self, layer, shards, bias, dtype, device):
        # shards are concatenated along the output dim (fused qkv / gate_up); rows: [sum(out), in]
        w = torch.cat([s.dequantize(torch.float32).to(dtype) for s in shards], dim=0)
        layer.weight = nn.Parameter(w.to(device), requires_grad=False)
        layer.bias = None if bias is None else nn.Parameter(bias.to(device, dtype), requires_grad=False)

    def apply(self, layer, x):
        return F.linear(x, layer.weight, layer.bias)  # x: [T, in] -> [T, out]


def select_method(shards: list[RawTensor], dtype: torch.dtype, device: torch.device,
                  quantize: str | None = None) -> QuantMethod:
    """Pick the method for one linear from its stored kinds (and an on-load quantization request)."""
    from ember.quant.gptq import GPTQMethod, gptq_ok
    from ember.quant.int4 import Int4Method, int4_ok
    from ember.quant.packed import PackedBlocksMethod, packed_ok

    if gptq_ok(shards, dtype, device):  # GPTQ / AWQ that fit group 32 on the CPU kernel; the rest run dense
        return GPTQMethod()
    if packed_ok(shards, dtype, device):  # ember's own kernel (AVX512-BF16); else PyTorch's int4 kernel
        return PackedBlocksMethod()
    if int4_ok(shards, dtype, device):
        return Int4Method()
    return DenseMethod()
