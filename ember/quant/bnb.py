"""NF4 / FP4 weights quantized on load with bitsandbytes (`ember.load(model, quantize="nf4")`).

Each linear's weight is dequantized to the compute dtype a bounded chunk at a time (one layer is the
most held), quantized in blocks of 64 (with `double_quant`, the block scales are quantized again),
and applied per call with `bitsandbytes.matmul_4bit`. On a CPU with AVX512-BF16, bitsandbytes' own
CPU layout is used (as its Linear4bit does at inference): its fused bf16 kernel runs a gemv about as
fast as PyTorch's int4 kernel, where the portable path dequantizes the whole weight on every call
(6-25x slower). That layout keeps the block scales as bf16, so double_quant saves no memory there.

bitsandbytes 0.50's CPU dequantizer is wrong when K % 64 != 0 (a block then spans two rows: 22 %
weight error instead of 9 % for a 40x96 NF4 weight), so such weights get zero columns up to a
multiple of 64 (an all-zero tail leaves a block's absmax alone) and x is zero-padded to match.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from ember.errors import ParameterError
from ember.quant.base import QuantMethod, QuantSpec, row_chunks
from ember.weights.base import RawTensor

BLOCK = 64  # weights per absmax block (the transformers / QLoRA default)
CPU_BLOCK_N = 32  # bitsandbytes' CPU layout interleaves output rows in blocks of this many


class _DropKernelsHubNote(logging.Filter):
    """bitsandbytes logs a warning at import when the optional `kernels` package (a hub download of a
    faster CPU gemm) is absent; its built-in CPU kernel is what we use, so the note is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


def import_bnb() -> ModuleType:
    """bitsandbytes, imported on first use; a clear error when it is not installed."""
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    note = _DropKernelsHubNote()
    log.addFilter(note)
    try:
        import bitsandbytes
    except ImportError:
        raise ParameterError("quantize='nf4' / 'fp4' needs bitsandbytes: pip install bitsandbytes "
                             "(or pip install 'ember[quant]')") from None
    finally:
        log.removeFilter(note)
    return bitsandbytes


def default_compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """bf16 on CPU (the fused kernel's only dtype); on accelerators the model's half dtype, else bf16."""
    if device.type != "cpu" and dtype in (torch.float16, torch.bfloat16):
        return dtype
    return torch.bfloat16


class BnbMethod(QuantMethod):
    """4-bit NormalFloat (nf4) or FloatPoint (fp4) blocks of 64, packed two per byte."""

    def __init__(self, spec: QuantSpec) -> None:
        self.spec = spec
        self.name = spec.method
        self._matmul: Callable[..., torch.Tensor] | None = None  # bitsandbytes.matmul_4bit, bound at pack

    def pack(self, layer: nn.Module, shards: list[RawTensor], bias: torch.Tensor | None,
             dtype: torch.dtype, device: torch.device) -> None:
        bnb = import_bnb()
        compute = self.spec.compute_dtype or default_compute_dtype(dtype, device)
        n, k = sum(s.shape[0] for s in shards), shards[0].shape[1]
        pad = (-k) % BLOCK
        w = torch.zeros(n, k + pad, dtype=compute)  # one layer in the compute dtype, filled chunk by chunk
        r = 0
        for chunk in row_chunks(shards):  # [rows, K] fp32, bounded
            w[r : r + chunk.shape[0], :k] = chunk
            r += chunk.shape[0]
        double = True if self.spec.double_quant is None else self.spec.double_quant
        q, state = bnb.functional.quantize_4bit(w.to(device), blocksize=BLOCK, quant_type=self.spec.method,
                                                compress_statistics=double)  # q: [N*K/2, 1] uint8
        del w
        to_cpu_layout = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)
        cpu_fused = (device.type == "cpu" and compute == torch.bfloat16 and to_cpu_layout is not None
                     and bnb.functional.has_avx512bf16() and n % CPU_BLOCK_N == 0)
        if cpu_fused:
            q, state = to_cpu_layout(q, state)  # q: [N, K/2]; matmul_4bit then takes the fused gemv path
        layer.qweight = nn.Parameter(q, requires_grad=False)
        layer.quant_state = state
        layer.cpu_fused, layer.k_pad = cpu_fused, pad
        layer.compute_dtype = compute
        layer.bias = None if bias is None else nn.Parameter(bias.to(device, compute), requires_grad=False)
        self._matmul = bnb.matmul_4bit

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(layer.compute_dtype)  # [T, K]
        if layer.k_pad:
            x2 = F.pad(x2, (0, layer.k_pad))  # [T, K+pad], matching the weight's zero columns
        # the portable path wants the packed weight transposed (as Linear4bit passes it); the CPU layout as is
        w = layer.qweight if layer.cpu_fused else layer.qweight.t()
        y = self._matmul(x2, w, layer.quant_state, bias=layer.bias)  # type: ignore[misc]  # [T, N]
        return y.view(*shape[:-1], y.shape[-1]).to(x.dtype)
