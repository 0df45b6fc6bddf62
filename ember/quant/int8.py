"""Weight-only int8 quantized on load (`ember.load(model, quantize="int8")`): symmetric, one scale per
output channel (scale = absmax / 127), activations stay in the model's dtype.

PyTorch's CPU kernel `_weight_int8pack_mm` is used only where it wins (torch 2.13, 2 AVX512 cores,
a 1536x576 weight): in bf16 at up to 8 rows (63 us at one row against 314 us dequantizing on the fly).
In fp32 and fp16 it is 4-20x slower than dequantizing, and from ~16 rows on (prefill) dequantizing
wins in bf16 too. Elsewhere (CUDA, a torch without the op) the weight is dequantized on the fly.

The kernel is wrong in bf16 when K % 16 != 0 (measured: NaN or relative errors from 4 % to 1e37 at one
row, a segfault at two or more; fp32 and fp16 are right), so such weights get zero columns up to a
multiple of 16 and x is zero-padded to match: ~10x faster at one row than falling back to dequantizing
(65 vs 650 us for a 1536x570 weight), for one small copy of x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.quant.base import QuantMethod, row_chunks
from ember.weights.base import RawTensor

K_ALIGN = 16  # the CPU kernel's bf16 path reads K in steps of 16
KERNEL_MAX_ROWS = 8  # above this many rows a dequantized bf16 matmul is faster than the kernel


def kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def quantize_rows(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] fp32 -> (q [N, K] int8 in -127..127, scale [N] in scale_dtype), w ~ q * scale."""
    scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(scale_dtype)
    # round against the scale as stored, so q * scale is the nearest grid point of what is computed
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Method(QuantMethod):
    name = "int8"

    def pack(self, layer: nn.Module, shards: list[RawTensor], bias: torch.Tensor | None,
             dtype: torch.dtype, device: torch.device) -> None:
        k = shards[0].shape[1]
        use_kernel = device.type == "cpu" and dtype == torch.bfloat16 and kernel_available()
        pad = (-k) % K_ALIGN if use_kernel else 0
        qs, scales = [], []
        for chunk in row_chunks(shards):  # [rows, K] fp32: per-row scales need no more than a chunk
            q, s = quantize_rows(chunk, dtype)
            qs.append(F.pad(q, (0, pad)) if pad else q)  # zero columns contribute nothing
            scales.append(s)
        layer.qweight = nn.Parameter(torch.cat(qs).to(device).contiguous(), requires_grad=False)  # [N, K+pad]
        layer.scales = nn.Parameter(torch.cat(scales).to(device), requires_grad=False)  # [N]
        layer.k, layer.k_pad, layer.use_kernel = k, pad, use_kernel
        layer.bias = None if bias is None else nn.Parameter(bias.to(device, dtype), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(layer.scales.dtype)  # [T, K]
        if layer.use_kernel and x2.shape[0] <= KERNEL_MAX_ROWS:
            if layer.k_pad:
                x2 = F.pad(x2, (0, layer.k_pad))  # [T, K+pad]
            y = torch.ops.aten._weight_int8pack_mm(x2, layer.qweight, layer.scales)  # [T, N]
        else:
            q = layer.qweight[:, : layer.k].to(x2.dtype)  # [N, K], dequantized on the fly
            if x2.dtype == torch.float16:  # x @ q.T is ~100x the output: scale the weight first, no overflow
                y = F.linear(x2, q * layer.scales[:, None])
            else:
                y = F.linear(x2, q) * layer.scales  # [T, N]; cheaper than scaling the N x K weight
        if layer.bias is not None:
            y = y + layer.bias
        return y.view(*shape[:-1], y.shape[-1])
