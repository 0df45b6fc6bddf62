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

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ember.quant.base import QuantMethod
from ember.quant.gguf_blocks import CHUNK_ROWS, GROUP, GROUP32_KINDS, KIND_BITS, Canonical, decode
from ember.weights.base import RawTensor

INT4_KINDS = GROUP32_KINDS  # torch's kernel has one scale per 32
PACK_ROWS = 64  # _convert_weight_to_int4pack_for_cpu lays rows out in blocks of this many


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


def pack_canonical(layer: nn.Module, chunks: Iterable[Canonical], planes: int, bias: torch.Tensor | None) -> None:
    """Row chunks of canonical codes (in output order, across shards) -> the kernel's buffers on `layer`."""
    packed: list[torch.Tensor] = []
    sz: list[torch.Tensor] = []
    buf: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def flush(final: bool) -> None:
        # the CPU packing works in blocks of 64 rows: pack whole blocks, carry the rest (a tail is fine last)
        q, scale, zero = (torch.cat(t) for t in zip(*buf, strict=True))
        cut = q.shape[0] if final else q.shape[0] // PACK_ROWS * PACK_ROWS
        packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[:cut].contiguous(), 1))
        sz.append(torch.stack((scale[:cut].t(), zero[:cut].t()), dim=-1).to(torch.bfloat16))  # [P*K/32, n, 2]
        buf[:] = [(q[cut:], scale[cut:], zero[cut:])] if cut < q.shape[0] else []

    for c in chunks:  # row chunks keep transients small (a 262k-row head); packing concatenates along N
        buf.append(to_planes(c, planes))  # [rows, P*K], [rows, P*K/32] x2
        if sum(b[0].shape[0] for b in buf) >= CHUNK_ROWS:
            flush(final=False)
    if buf:
        flush(final=True)
    layer.planes = planes
    layer.qweight = nn.Parameter(torch.cat(packed), requires_grad=False)
    layer.scales_zeros = nn.Parameter(torch.cat(sz, dim=1).contiguous(), requires_grad=False)
    layer.bias = None if bias is None else nn.Parameter(bias.to(torch.bfloat16), requires_grad=False)


def gguf_chunks(shards: list[RawTensor]) -> Iterator[Canonical]:
    for shard in shards:
        n, k = shard.shape[0], shard.shape[1]
        for r in range(0, n, CHUNK_ROWS):
            yield decode(shard.kind, shard.data[r : r + CHUNK_ROWS], (min(CHUNK_ROWS, n - r), k))


class Int4Method(QuantMethod):
    """GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K kept packed: 0.5 byte per weight per plane."""

    name = "int4"

    def pack(self, layer: nn.Module, shards: list[RawTensor], bias: torch.Tensor | None,
             dtype: torch.dtype, device: torch.device) -> None:
        planes = 2 if any(KIND_BITS[s.kind] > 4 for s in shards) else 1
        pack_canonical(layer, gguf_chunks(shards), planes, bias)

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
