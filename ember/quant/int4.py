"""Group-32 int4 weights on PyTorch's CPU int4 kernel, fed from GGUF blocks without dequantizing.

The kernel computes w = (q - 8) * scale + zero per group of 32 along K, with q in 0..15 and bf16
activations. A canonical block code q * s + o with up to 8 bits is split into two 4-bit planes,
q = 16 * hi + lo, laid side by side along K (x is repeated to match):
    w = 16s * (hi - 8) + s * (lo - 8) + (o + 136 s)        (8-bit codes: hi in 0..15)
    w = 16s * (hi + 8 - 8) + s * (lo - 8) + (o + 8 s)      (5-bit codes: hi stored as 8..9, a small zero)
so Q5_0/Q5_1/Q5_K and Q8_0 run exactly on the same kernel as Q4_0/Q4_1/Q4_K (one plane); the kernel's
bf16 scales and zeros then lose no more than a bf16 copy of the weights would.
"""

from __future__ import annotations

import torch
from torch import nn

from ember.quant.base import QuantMethod
from ember.quant.gguf_blocks import DECODERS, GROUP, Canonical, decode
from ember.weights.base import RawTensor

INT4_KINDS = frozenset(DECODERS)


def kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def to_planes(c: Canonical, planes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Canonical codes -> (q [N, P*K] int32 in 0..15, scale [N, P*K/32], zero [N, P*K/32]) in fp32."""
    s, o = c.scale, c.offset
    if planes == 1:
        assert c.bits <= 4
        return c.q.to(torch.int32), s, o + 8 * s
    if c.bits <= 4:  # padding plane for a fused layer whose other shards need two planes: contributes 0
        hi, hi_s, lo_z = torch.full_like(c.q, 8), torch.zeros_like(s), o + 8 * s
    else:
        # a 5-bit code's hi bit is stored as 8..9, so the kernel's "- 8" cancels and the zero stays o + 8s as
        # for one plane: o + 136s (~120 steps) would lose ~0.25 of a step per weight to the bf16 zero
        shift = 8 if c.bits <= 7 else 0
        hi, hi_s, lo_z = (c.q >> 4) + shift, 16 * s, o + (136 - 16 * shift) * s
    q = torch.cat((hi, c.q & 0xF), dim=1).to(torch.int32)
    return q, torch.cat((hi_s, s), dim=1), torch.cat((torch.zeros_like(o), lo_z), dim=1)


class Int4Method(QuantMethod):
    """GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K kept packed: 0.5 byte per weight per plane."""

    name = "int4"

    def pack(self, layer: nn.Module, shards: list[RawTensor], bias: torch.Tensor | None,
             dtype: torch.dtype, device: torch.device) -> None:
        canon = [decode(s.kind, s.data, (s.shape[0], s.shape[1])) for s in shards]
        planes = 2 if any(c.bits > 4 for c in canon) else 1
        parts = [to_planes(c, planes) for c in canon]
        q = torch.cat([p[0] for p in parts], dim=0)  # [N, P*K]
        scale = torch.cat([p[1] for p in parts], dim=0)  # [N, P*K/32]
        zero = torch.cat([p[2] for p in parts], dim=0)
        layer.planes = planes
        layer.qweight = nn.Parameter(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), requires_grad=False)
        sz = torch.stack((scale.t(), zero.t()), dim=-1).to(torch.bfloat16).contiguous()  # [P*K/32, N, 2]
        layer.scales_zeros = nn.Parameter(sz, requires_grad=False)
        layer.bias = None if bias is None else nn.Parameter(bias.to(torch.bfloat16), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # [T, K]
        if layer.planes == 2:
            x = torch.cat((x, x), dim=-1)  # [T, 2K]: one copy per plane
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.qweight, GROUP, layer.scales_zeros)
        if layer.bias is not None:
            y = y + layer.bias
        return y.view(*shape[:-1], y.shape[-1])


def int4_ok(shards: list[RawTensor], dtype: torch.dtype, device: torch.device) -> bool:
    return (device.type == "cpu" and dtype == torch.bfloat16 and kernel_available()
            and all(s.kind in INT4_KINDS and len(s.shape) == 2 and s.shape[1] % GROUP == 0 for s in shards))
