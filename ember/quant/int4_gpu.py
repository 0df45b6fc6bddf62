"""GGUF Q4/Q5 and GPTQ/AWQ 4-bit linears kept 4-bit on a CUDA GPU, on PyTorch's own int4 kernel (tinygemm).

`_weight_int4pack_mm(x bf16 [M, K'], w, group, scales_zeros bf16 [K'/group, N, 2])` computes
w = (q - 8) * scale + zero per group along K with q in 0..15 (int4mm.cu: magic-number bf16 q - 8, then one
bf16 fma): the formula of the CPU kernel int4.py uses. Its weight comes from
`_convert_weight_to_int4pack(nibbles uint8 [N, K'/2], inner_k_tiles)`, each byte two codes along K with the
even one in the high nibble (byte j = q[2j] << 4 | q[2j + 1]). Codes go through int4.to_planes unchanged:
Q4_0/Q4_1/Q4_K and GPTQ/AWQ are one plane (K' = K); Q5_0/Q5_1/Q5_K two (K' = 2K, x repeated per plane).

The kernel is built for decode (it pads M to tiles of 16): batches of at most DECODE_ROWS rows run on it
(every decode bucket of the CUDA graphs: dequantizing the whole weight each step would cost more).
Larger (prefill) batches dequantize the weight to bf16 a row tile at a time from a second copy of the codes,
plain nibbles [N, K'/2], and run F.linear (cuBLAS). So each plane costs two 0.5 B/weight copies plus the
scales and zeros (4 B per group of 32, 0.125 B/weight; less where GPTQ/AWQ groups are coarser): one plane
1.0-1.125 B/weight, about half of bf16's 2 B; two planes (Q5) 2.25 B, a little more than bf16, but decode
reads 1.25 B of it where bf16 reads 2.

Q6_K (a scale per 16; the kernel's smallest group is 32) and Q8_0 (two full planes: 2 B/weight kept, no
saving over bf16) stay on DenseMethod (bf16) on the GPU, as does any fused layer with such a shard.

Kernel constraints (int4mm.cu): bf16 activations, sm80+; group 32/64/128/256 dividing K';
inner_k_tiles 2/4/8 with K' % (inner_k_tiles * 16) == 0 (the largest that divides is used: K % 32 == 0
always admits 2); N % 8 == 0 (the packed layout has n-tiles of 8, and the scales must cover them exactly).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ember.quant.base import QuantMethod
from ember.quant.gguf_blocks import CHUNK_ROWS, GROUP, KIND_BITS, Canonical
from ember.quant.gptq import GPTQTensor, gptq_chunks, gptq_shards_fit
from ember.quant.int4 import gguf_chunks, to_planes

GPU_KINDS = frozenset({"Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K"})
GROUPS = (256, 128, 64, 32)  # the kernel's group sizes, coarsest first
DECODE_ROWS = 256  # decode batches; prompt chunks dequantize and run cuBLAS (crossover: gpu_check's matmul table)
TILE_ELEMS = 1 << 24  # weights dequantized at a time for prefill: ~200 MB of fp32/bf16 transients
N_TILE = 8  # rows per n-tile of the packed layout


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] in 0..15 -> [N, K/2] uint8, as the CUDA converter reads them: even k in the high nibble."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_nibbles(b: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 -> codes [N, K] uint8 (inverse of pack_nibbles)."""
    return torch.stack((b >> 4, b & 0xF), dim=-1).flatten(-2)


def to_gpu_layout(c: Canonical, planes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical codes -> (nibbles [n, P*K/2] uint8, scales_zeros [P*K/32, n, 2] bf16), group 32."""
    q, s, z = to_planes(c, planes)  # [n, P*K] int32, [n, P*K/32] fp32 x2
    return pack_nibbles(q), torch.stack((s.t(), z.t()), dim=-1).to(torch.bfloat16)


def coarsest_group(scales_zeros: torch.Tensor, k: int) -> int:
    """The largest kernel group dividing K (one plane's width) over which every group-32 scale and zero
    repeat (GPTQ/AWQ groups of 64-256, or -1); fewer scales to store and read, the same weights."""
    for g in GROUPS:
        f = g // GROUP
        if k % g:
            continue
        blocks = scales_zeros.unflatten(0, (-1, f))  # [P*K/g, f, N, 2]
        if f == 1 or bool((blocks == blocks[:, :1]).all()):
            return g
    raise AssertionError("K is a multiple of 32")


def inner_k_tiles(k_packed: int) -> int:
    """The widest packing (8/4/2 k-tiles of 16 per load) that divides K' = P*K."""
    return next(t for t in (8, 4, 2) if k_packed % (t * 16) == 0)


def dequant(q: torch.Tensor, scales_zeros: torch.Tensor, group: int, planes: int = 1) -> torch.Tensor:
    """Nibbles [n, P*K/2] + scales_zeros [P*K/group, n, 2] -> the weight bf16 [n, K]: (q - 8) * s + z per group
    in fp32 (the kernel's formula), planes summed in fp32, rounded once."""
    n = q.shape[0]
    w = unpack_nibbles(q).view(n, -1, group).float()  # [n, P*K/g, g]
    s, z = scales_zeros.float().permute(2, 1, 0)  # [n, P*K/g] each
    w = (w - 8) * s[..., None] + z[..., None]
    return w.view(n, planes, -1).sum(1).to(torch.bfloat16)  # [n, K]


def dequant_linear(x: torch.Tensor, q: torch.Tensor, scales_zeros: torch.Tensor, group: int,
                   planes: int) -> torch.Tensor:
    """x bf16 [M, K] @ W.T -> [M, N], W dequantized a row tile at a time (bounded transient)."""
    n, k = q.shape[0], q.shape[1] * 2 // planes
    step = max(1, TILE_ELEMS // (planes * k))
    if step >= n:
        return F.linear(x, dequant(q, scales_zeros, group, planes))
    y = x.new_empty(x.shape[0], n)
    for r in range(0, n, step):
        y[:, r : r + step] = F.linear(x, dequant(q[r : r + step], scales_zeros[:, r : r + step], group, planes))
    return y


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Nibbles [N, K'/2] (on the GPU) -> the kernel's int32 [N/8, K'/(ikt*16), 32, ikt/2]. Row blocks of
    whole n-tiles pack independently (dim 0 is the n-tile), which keeps the converter's 32-bit indexing safe."""
    ikt = inner_k_tiles(q.shape[1] * 2)
    return torch.cat([torch.ops.aten._convert_weight_to_int4pack(q[r : r + CHUNK_ROWS].contiguous(), ikt)
                      for r in range(0, q.shape[0], CHUNK_ROWS)])  # CHUNK_ROWS % 16 == 0: whole n-tiles


def _planes(shards: list[Any]) -> int:
    return 2 if any(KIND_BITS.get(s.kind, 4) > 4 for s in shards) else 1


def _chunks(shards: list[Any]) -> tuple[Iterator[Canonical], torch.Tensor | None]:
    """Row chunks of canonical codes, and the act-order perm of x (GPTQ/AWQ; shared: gptq_shards_fit)."""
    if isinstance(shards[0], GPTQTensor):
        return gptq_chunks(shards), shards[0].perm
    return gguf_chunks(shards), None


class Int4GpuMethod(QuantMethod):
    """GGUF Q4_0/Q4_1/Q4_K/Q5_0/Q5_1/Q5_K and GPTQ/AWQ 4-bit on the CUDA int4 kernel (decode) and on
    cuBLAS from dequantized row tiles (prefill). On the CPU (tests) only the prefill path exists."""

    name = "int4-gpu"

    def pack(self, layer: nn.Module, shards: list[Any], bias: torch.Tensor | None,
             dtype: torch.dtype, device: torch.device) -> None:
        planes, k = _planes(shards), shards[0].shape[1]
        n = sum(s.shape[0] for s in shards)
        chunks, perm = _chunks(shards)
        q = torch.empty(n, planes * k // 2, dtype=torch.uint8, device=device)
        sz = torch.empty(planes * k // GROUP, n, 2, dtype=torch.bfloat16, device=device)
        r = 0
        for c in chunks:  # decoded on the host a chunk at a time, copied straight into the device buffers
            cq, csz = to_gpu_layout(c, planes)
            q[r : r + cq.shape[0]], sz[:, r : r + cq.shape[0]] = cq, csz
            r += cq.shape[0]
        layer.group = coarsest_group(sz, k)
        layer.planes = planes
        layer.qnibbles = nn.Parameter(q, requires_grad=False)
        layer.scales_zeros = nn.Parameter(sz[:: layer.group // GROUP].contiguous(), requires_grad=False)
        layer.qweight = nn.Parameter(pack_int4(q), requires_grad=False) if device.type == "cuda" else None
        layer.register_buffer("perm", None if perm is None else perm.to(device))
        layer.bias = None if bias is None else nn.Parameter(bias.to(device, torch.bfloat16), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # [T, K]
        if layer.perm is not None:
            x = x.index_select(-1, layer.perm)  # the packed (group-contiguous) column order
        if layer.qweight is not None and 0 < x.shape[0] <= DECODE_ROWS:
            xk = torch.cat((x, x), dim=-1) if layer.planes == 2 else x.contiguous()  # [T, P*K]
            y = torch.ops.aten._weight_int4pack_mm(xk, layer.qweight, layer.group, layer.scales_zeros)
        else:
            y = dequant_linear(x, layer.qnibbles, layer.scales_zeros, layer.group, layer.planes)
        if layer.bias is not None:
            y = y + layer.bias
        return y.view(*shape[:-1], y.shape[-1])


def int4_gpu_ok(shards: list[Any], dtype: torch.dtype, device: torch.device) -> bool:
    """Shards this method runs exactly: CUDA sm80+ (not ROCm: its tiles differ), bf16, eligible kinds only
    (all GGUF or all GPTQ/AWQ), 2-D with K % 32 == 0 and N % 8 == 0. Otherwise the caller runs DenseMethod."""
    if not (device.type == "cuda" and dtype == torch.bfloat16 and torch.version.hip is None
            and hasattr(torch.ops.aten, "_weight_int4pack_mm") and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= (8, 0)):
        return False
    return shapes_ok(shards)


def shapes_ok(shards: list[Any]) -> bool:
    """The device-independent part of int4_gpu_ok (tested on the CPU)."""
    if not shards or any(len(s.shape) != 2 or s.shape[1] != shards[0].shape[1] for s in shards):
        return False
    if isinstance(shards[0], GPTQTensor):
        kinds_ok = gptq_shards_fit(shards)
    else:
        kinds_ok = all(s.kind in GPU_KINDS for s in shards)
    return kinds_ok and shards[0].shape[1] % GROUP == 0 and sum(s.shape[0] for s in shards) % N_TILE == 0
