"""GGUF block formats decoded to one canonical form: w = q * scale + offset, groups of 32 along K
(16 for Q6_K, whose sub-blocks of 16 have their own scales).

q is an unsigned integer code (4 to 8 bits), scale and offset are fp32 per group. For every
kind handled here the canonical form reproduces gguf-py's dequantizers bit for bit (the products
involved are exact in fp32), so the int4 kernel mapping can be derived from it without guessing.
Block layouts: ggml-quants (llama.cpp) / gguf-py quants.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ember.kernels import cpu_ops

GROUP = 32
QK_K = 256
ZERO = {"Q6_K": 32}  # kinds whose offset is -zero * scale, computed by gguf-py as (q - zero) * scale


@dataclass
class Canonical:
    q: torch.Tensor  # [N, K] uint8 codes in 0 .. 2**bits - 1
    scale: torch.Tensor  # [N, K / group] fp32
    offset: torch.Tensor  # [N, K / group] fp32
    bits: int
    zero: int | None = None  # offset == -zero * scale exactly (Q6_K): gguf-py computes (q - zero) * scale

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    def dequantize(self) -> torch.Tensor:
        """[N, K] fp32, computed in gguf-py's order (q * scale, then + offset; or (q - zero) * scale)."""
        n, k = self.q.shape
        q = self.q.view(n, k // self.group, self.group).float()
        if self.zero is not None:
            return ((q - self.zero) * self.scale[..., None]).view(n, k)
        return (q * self.scale[..., None] + self.offset[..., None]).view(n, k)

    def to_group16(self) -> Canonical:
        """The same weights with one scale and offset per 16 (each group-32 value twice)."""
        if self.group == 16:
            return self
        return Canonical(self.q, self.scale.repeat_interleave(2, dim=1), self.offset.repeat_interleave(2, dim=1),
                         self.bits, self.zero)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Bytes [..., 2] (little-endian IEEE half) -> fp32 [...]."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32] codes: element j is the low nibble of byte j, j+16 the high one."""
    return torch.cat((qs & 0xF, qs >> 4), dim=-1)


def _bits(b: torch.Tensor, count: int) -> torch.Tensor:
    """Little-endian bit field [..., count // 8] bytes -> [..., count] of 0/1."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((b[..., :, None] >> shifts) & 1).reshape(*b.shape[:-1], count)


def _blocks(data: np.ndarray, n: int, block_bytes: int) -> torch.Tensor:
    """Raw rows [N, bytes] -> [N, blocks, block_bytes] uint8 (copies off the memory map)."""
    t = torch.from_numpy(np.ascontiguousarray(data).copy())
    return t.view(n, -1, block_bytes)


def _q4_0(b: torch.Tensor) -> Canonical:  # block: d f16, 16 bytes of nibbles; w = d * (q - 8)
    d = _f16(b[..., 0:2])
    return Canonical(_nibbles(b[..., 2:18]), d, -8 * d, 4)


def _q4_1(b: torch.Tensor) -> Canonical:  # d, m f16, nibbles; w = d * q + m
    return Canonical(_nibbles(b[..., 4:20]), _f16(b[..., 0:2]), _f16(b[..., 2:4]), 4)


def _q5_0(b: torch.Tensor) -> Canonical:  # d, 32 high bits, nibbles; w = d * (q - 16)
    d = _f16(b[..., 0:2])
    q = _nibbles(b[..., 6:22]) | (_bits(b[..., 2:6], 32) << 4)
    return Canonical(q, d, -16 * d, 5)


def _q5_1(b: torch.Tensor) -> Canonical:  # d, m, 32 high bits, nibbles; w = d * q + m
    q = _nibbles(b[..., 8:24]) | (_bits(b[..., 4:8], 32) << 4)
    return Canonical(q, _f16(b[..., 0:2]), _f16(b[..., 2:4]), 5)


def _q8_0(b: torch.Tensor) -> Canonical:  # d, 32 int8; w = d * q, stored here as (q + 128) - 128
    d = _f16(b[..., 0:2])
    q = (b[..., 2:34].view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
    return Canonical(q, d, -128 * d, 8)


def _k_scales(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins per super-block."""
    sc = sc.to(torch.int32)
    lo, hi = sc[..., 0:4], sc[..., 4:8]
    tail = sc[..., 8:12]
    scales = torch.cat((lo & 63, (tail & 0xF) | ((lo >> 6) << 4)), dim=-1)
    mins = torch.cat((hi & 63, (tail >> 4) | ((hi >> 6) << 4)), dim=-1)
    return scales.float(), mins.float()


def _k_groups(d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor, m: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    scale = d[..., None] * sc  # [N, S, 8]
    offset = -(dmin[..., None] * m)
    return scale.flatten(-2), offset.flatten(-2)


def _q4_k(b: torch.Tensor) -> Canonical:
    # d, dmin f16 | 12 bytes scales/mins | 128 bytes: 4 chunks of 32 bytes, low nibbles = sub-block 2i,
    # high nibbles = sub-block 2i+1; w = d * sc * q - dmin * m
    qs = b[..., 16:144].reshape(*b.shape[:-1], 4, 32)
    q = torch.stack((qs & 0xF, qs >> 4), dim=-2).reshape(*b.shape[:-1], QK_K)
    scale, offset = _k_groups(_f16(b[..., 0:2]), _f16(b[..., 2:4]), *_k_scales(b[..., 4:16]))
    return Canonical(q, scale, offset, 4)


def _q5_k(b: torch.Tensor) -> Canonical:
    # as Q4_K plus qh[32]: bit (2i) of qh[l] is the fifth bit of sub-block 2i, element l; bit 2i+1 likewise
    qs = b[..., 48:176].reshape(*b.shape[:-1], 4, 32)
    low = torch.stack((qs & 0xF, qs >> 4), dim=-2)  # [..., 4, 2, 32]
    qh = b[..., 16:48]  # [..., 32]
    shifts = torch.arange(8, dtype=torch.uint8).view(4, 2, 1)
    high = (qh[..., None, None, :] >> shifts) & 1  # [..., 4, 2, 32]
    q = (low | (high << 4)).reshape(*b.shape[:-1], QK_K)
    scale, offset = _k_groups(_f16(b[..., 0:2]), _f16(b[..., 2:4]), *_k_scales(b[..., 4:16]))
    return Canonical(q, scale, offset, 5)


def _q6_k(b: torch.Tensor) -> Canonical:
    # ql[128]: 2 halves of 64 bytes, low nibbles = elements 0..63 of the half, high = 64..127 (as 2 x 32);
    # qh[64]: 2 halves of 32 bytes, bit pairs 0/2/4/6 = the top 2 bits of the half's 4 runs of 32;
    # scales: 16 int8 (one per 16 elements); d f16 last. w = d * sc * (q - 32), q in 0..63
    lead = b.shape[:-1]
    ql = b[..., 0:128].reshape(*lead, 2, 1, 64)
    ql = torch.cat(((ql & 0xF), (ql >> 4)), dim=-2).reshape(*lead, 2, 4, 32)  # [..., half, run, 32]
    qh = b[..., 128:192].reshape(*lead, 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)
    qh = (qh >> shifts) & 3  # [..., half, run, 32]
    q = (ql | (qh << 4)).reshape(*lead, QK_K)
    scale = _f16(b[..., 208:210])[..., None] * b[..., 192:208].view(torch.int8).float()  # [..., 16]
    return Canonical(q, scale, -ZERO["Q6_K"] * scale, 6, zero=ZERO["Q6_K"])


# kind -> (bytes per block, elements per block, decoder)
DECODERS = {
    "Q4_0": (18, 32, _q4_0), "Q4_1": (20, 32, _q4_1), "Q5_0": (22, 32, _q5_0), "Q5_1": (24, 32, _q5_1),
    "Q8_0": (34, 32, _q8_0), "Q4_K": (144, QK_K, _q4_k), "Q5_K": (176, QK_K, _q5_k), "Q6_K": (210, QK_K, _q6_k),
}
GROUP16 = frozenset({"Q6_K"})  # one scale per 16 elements
GROUP32_KINDS = frozenset(DECODERS) - GROUP16


# the kind numbers of csrc/qpack.c's enum
KIND_ID = {kind: i for i, kind in enumerate(("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"))}
# kinds whose offset is -2^e * scale (w = d (q - z)): their tiles keep no offsets, the kernels compute them
ZERO_EXP = {"Q4_0": 3, "Q5_0": 4, "Q8_0": 7, "Q6_K": 5}
KIND_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6}
CHUNK_ROWS = 8192  # rows decoded at a time: bounds the transient memory of big tensors (a 262k vocab)


def decode(kind: str, data: np.ndarray, shape: tuple[int, int]) -> Canonical:
    """Raw GGUF rows [N, bytes per row] of a 2-D tensor [N, K] -> canonical codes, scales and offsets."""
    block_bytes, _, fn = DECODERS[kind]
    n, k = shape
    groups = k // (16 if kind in GROUP16 else GROUP)  # one scale per group (K-quants: per sub-block)
    q = torch.empty(n, k, dtype=torch.uint8)
    scale = torch.empty(n, groups, dtype=torch.float32)
    offset = torch.empty(n, groups, dtype=torch.float32)
    zero = ZERO.get(kind)
    lib = cpu_ops()
    if lib is not None:  # the same values from C, straight off the memory map (ten times faster)
        rows = np.ascontiguousarray(data, dtype=np.uint8)
        if rows.size != n * (k // DECODERS[kind][1]) * block_bytes:
            raise ValueError(f"{kind} rows of {rows.size} bytes do not hold a [{n}, {k}] tensor")
        lib.ember_gguf_decode(KIND_ID[kind], rows.ctypes.data, n, k, q.data_ptr(), scale.data_ptr(),
                              offset.data_ptr())
        return Canonical(q, scale, offset, KIND_BITS[kind], zero)
    for r in range(0, n, CHUNK_ROWS):
        rows = min(CHUNK_ROWS, n - r)
        c = fn(_blocks(data[r : r + rows], rows, block_bytes))
        q[r : r + rows] = c.q.reshape(rows, k)
        scale[r : r + rows] = c.scale.reshape(rows, groups)
        offset[r : r + rows] = c.offset.reshape(rows, groups)
    return Canonical(q, scale, offset, KIND_BITS[kind], zero)
