"""The QuantMethod seam: every linear layer packs its weights once at load and applies them per call.

A method is chosen from what the checkpoint says about each weight (its `kind`), never from a file
name. Later methods (int4 blocks, GPTQ/AWQ, int8, NF4) plug in by registering here; model code
never changes per format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ember.errors import ParameterError
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
        w = torch.cat([s.dequantize(dtype) for s in shards], dim=0)
        layer.weight = nn.Parameter(w.to(device), requires_grad=False)
        layer.bias = None if bias is None else nn.Parameter(bias.to(device, dtype), requires_grad=False)

    def apply(self, layer, x):
        return F.linear(x, layer.weight, layer.bias)  # x: [T, in] -> [T, out]


QUANTIZE_METHODS = ("nf4", "fp4", "int8")


@dataclass(frozen=True)
class QuantSpec:
    """An on-load quantization request: `ember.load(quantize=..., double_quant=..., compute_dtype=...)`.

    double_quant and compute_dtype only mean something to the 4-bit bitsandbytes methods; None is
    "not given", so a stray value with int8 is an error rather than silently ignored.
    """

    method: str
    double_quant: bool | None = None
    compute_dtype: torch.dtype | str | None = None  # a name ('bfloat16', 'fp16', ...) becomes a torch.dtype

    def __post_init__(self) -> None:
        from ember.config import _DTYPES

        method = self.method.lower() if isinstance(self.method, str) else self.method
        if method not in QUANTIZE_METHODS:
            raise ParameterError(f"quantize={self.method!r} is invalid: use one of "
                                 f"{', '.join(repr(m) for m in QUANTIZE_METHODS)} (or None for no quantization)")
        object.__setattr__(self, "method", method)
        if method not in ("nf4", "fp4"):
            for name in ("double_quant", "compute_dtype"):
                if getattr(self, name) is not None:
                    raise ParameterError(f"{name}={getattr(self, name)!r} only applies to quantize='nf4' or 'fp4', "
                                         f"not {method!r}")
        if self.double_quant is not None and not isinstance(self.double_quant, bool):
            raise ParameterError(f"double_quant={self.double_quant!r} is invalid: it must be True or False")
        dt = self.compute_dtype
        if isinstance(dt, str):
            dt = _DTYPES.get(dt)
        if self.compute_dtype is not None and dt not in (torch.bfloat16, torch.float16, torch.float32):
            raise ParameterError(f"compute_dtype={self.compute_dtype!r} is invalid: use bfloat16, float16 or float32")
        object.__setattr__(self, "compute_dtype", dt)


def row_chunks(shards: list[RawTensor], max_elems: int = 1 << 24, dtype: torch.dtype = torch.float32,
               multiple: int = 1) -> Iterator[torch.Tensor]:
    """The fused weight's rows in `dtype`, a bounded chunk [rows, in] at a time: quantizing on load never
    holds a dequantized copy of more than this (shards' data rows are output rows, see RawTensor). Chunks
    hold a multiple of `multiple` rows, but a shard's last one."""
    for s in shards:
        n, k = s.shape[0], s.shape[1]
        if s.data.ndim != 2 or s.data.shape[0] != n:  # not row-addressable: dequantize it whole
            yield s.dequantize(dtype).reshape(n, k)
            continue
        step = max(multiple, max_elems // k // multiple * multiple)
        for r in range(0, n, step):
            part = replace(s, shape=(min(step, n - r), k), data=s.data[r : r + step])
            yield part.dequantize(dtype)  # [rows, K]


def kernel_apply(layer: nn.Module, x: torch.Tensor,
                 matmul: Callable[[torch.Tensor, torch.dtype], torch.Tensor]) -> torch.Tensor:
    """x [..., K] -> [..., layer.n_out] through one of ember's CPU kernels, `matmul(rows, out_dtype)` with rows
    contiguous bf16 or fp32 [T, K]: fp32 out where the layer asks for it (`out_f32`: the head), else bf16;
    the layer's bias added."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    if x.dtype not in (torch.bfloat16, torch.float32) or not x.is_contiguous():
        x = x.to(torch.bfloat16).contiguous()  # [T, K]
    y = matmul(x, torch.float32 if getattr(layer, "out_f32", False) else torch.bfloat16)
    if layer.bias is not None:
        y = y + layer.bias
    return y.view(*shape[:-1], layer.n_out)


def select_method(shards: list[RawTensor], dtype: torch.dtype, device: torch.device,
                  quantize: QuantSpec | None = None, compact: bool = True) -> QuantMethod:
    """Pick the method for one linear from its stored kinds (and an on-load quantization request); compact: the
    packed method's layouts (packed.compact_layouts)."""
    from ember.quant.bf16tile import Bf16TileMethod, bf16_ok
    from ember.quant.gptq import GPTQMethod, gptq_ok
    from ember.quant.int4 import Int4Method, int4_ok
    from ember.quant.packed import PackedBlocksMethod, packed_ok

    if quantize is not None:  # asked for on load; the loader passes None for the output head
        from ember.quant.bnb import BnbMethod
        from ember.quant.int8 import Int8Method

        return Int8Method() if quantize.method == "int8" else BnbMethod(quantize)
    if device.type == "cuda":  # GGUF Q4/Q5 and GPTQ/AWQ stay 4-bit on the GPU; the rest (Q6_K, Q8_0, ...) dense
        from ember.quant.int4_gpu import Int4GpuMethod, int4_gpu_ok

        return Int4GpuMethod() if int4_gpu_ok(shards, dtype, device) else DenseMethod()
    if gptq_ok(shards, dtype, device):  # GPTQ / AWQ that fit group 32 on the CPU kernel; the rest run dense
        return GPTQMethod()
    if packed_ok(shards, dtype, device):  # ember's own kernel (AVX512 or AVX2); else PyTorch's int4 kernel
        return PackedBlocksMethod(compact)
    if int4_ok(shards, dtype, device):
        return Int4Method()
    if bf16_ok(shards, dtype, device):  # F16 / BF16 / F32 weights of a bf16 model: ember's bf16 kernel
        return Bf16TileMethod()
    return DenseMethod()
