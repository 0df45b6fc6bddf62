"""GGUF block codes kept packed in ember's tile layout and run by ember's int8 kernel (kernels/csrc/qtile.c;
qtile_avx2.c on CPUs without AVX512, the same bits).

Rows go in tiles of 16; per (tile, block of 32) the 16 rows' codes sit in the operand order of the CPU's
int8 dot-product instructions: 4-bit codes as nibbles (256 bytes, 16 bytes per row-block as Q4_1 itself),
5-6 bit codes as nibbles + a 2-bit plane (384 bytes), 8-bit codes as bytes; fp16 scale and offset per
row-block (two per row-block, one per 16, for Q6_K and any layer fused with it), no offsets for the
symmetric kinds (Q4_0, Q5_0, Q8_0, Q6_K: o = -2^zexp s, computed by the kernels). Activations are quantized
per block of 32 to int8 (act_bits=8: llama.cpp's numerics, the result is W x^ for the quantized x^;
perplexity within 0.4 % of the exact mode on SmolLM2 and Gemma 3 270M; per 256 for layers with a scale per 16,
Q6_K's and those fused with it, as llama.cpp's Q8_K: with Q6_K's own scales a super-block sums in integers) or
split into two int8 parts (~16 bits
kept: act_bits=16, the exact mode, twice the integer work); by default 8 from ~1B weights, 16 below (see
INT8_FROM_WEIGHTS). Every block sum is an exact integer and one float epilogue follows, so the gemv (few rows)
and the AMX-INT8 kernel (many rows) give the same bits, and a sequence's output never depends on how many
others share its step.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from ember.kernels import cpu_ops
from ember.quant.base import QuantMethod, kernel_apply
from ember.quant.gguf_blocks import DECODERS, GROUP, GROUP16, KIND_BITS, KIND_ID, ZERO_EXP, Canonical
from ember.quant.int4 import gguf_chunks
from ember.weights.base import RawTensor

TILE = 16  # weight rows per tile
MAX_GEMV_ROWS = 4  # more activation rows take AMX where the CPU has it (same result, faster)
LAYOUT_BYTES = [256, 512, 384, 320]  # bytes per (tile, block) of csrc/qtile.h's layouts NIBBLES, BYTES, SIX, FIVE


def layout_of(bits: int, compact: bool = True) -> int:
    """The code layout for codes of `bits`: 4-bit nibbles, 5 bits as nibbles + a bit plane (compact; else the 6-bit
    layout), 6 bits as nibbles + a 2-bit plane, else bytes."""
    return 0 if bits <= 4 else 3 if bits == 5 and compact else 2 if bits <= 6 else 1


def available() -> bool:
    lib = cpu_ops()
    return lib is not None and bool(lib.ember_qtile_available())


@functools.cache
def amx_available() -> bool:
    """AMX-INT8 tiles (Sapphire Rapids and later) and the kernel built for them; asks Linux for the tile state."""
    lib = cpu_ops()
    return (lib is not None and bool(lib.ember_qtile_amx_built()) and bool(lib.ember_amx_available())
            and os.environ.get("EMBER_AMX", "1") != "0")


def pack_tiles(c: Canonical, codes: torch.Tensor, s16: torch.Tensor, o16: torch.Tensor) -> None:
    """Canonical codes [N, K] -> tiles written into codes [ceil(N/16), K/32, 512 or 256] u8 and scales /
    offsets fp16 [ceil(N/16), K/32, 16] ([..., 2 halves x 16]: a scale per 16); the last tile's missing
    rows are zeros."""
    n, k = c.q.shape
    q, s, o = c.q.contiguous(), c.scale.float().contiguous(), c.offset.float().contiguous()
    assert codes.is_contiguous() and s16.is_contiguous() and o16.is_contiguous() and codes.shape[0] == -(-n // TILE)
    cpu_ops().ember_qtile_pack(q.data_ptr(), s.data_ptr(), o.data_ptr(), n, k, c.group,  # type: ignore[union-attr]
                               LAYOUT_BYTES.index(codes.shape[2]), int(s16.shape[2] == 2 * TILE), codes.data_ptr(),
                               s16.data_ptr(), o16.data_ptr())


def _whole_tiles(chunks: Iterable[Canonical]) -> Iterator[Canonical]:
    """Re-cut row chunks so that each but the last holds whole tiles (chunks end anywhere: fused shards)."""
    carry: Canonical | None = None
    for c in chunks:
        if carry is not None:
            c = Canonical(torch.cat((carry.q, c.q)), torch.cat((carry.scale, c.scale)),
                          torch.cat((carry.offset, c.offset)), max(carry.bits, c.bits))
        cut = c.q.shape[0] // TILE * TILE
        carry = Canonical(c.q[cut:], c.scale[cut:], c.offset[cut:], c.bits) if cut < c.q.shape[0] else None
        if cut:
            yield Canonical(c.q[:cut], c.scale[:cut], c.offset[:cut], c.bits)
    if carry is not None:
        yield carry


def _alloc(n: int, k: int, bits: int, sub16: bool, ks: bool = False,
           compact: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty tiles for a [n, k] weight: codes [T, K/32, LAYOUT_BYTES] u8, scales and offsets [T, K/32, 16 or 32];
    with K-quant scales (ks) fp16 d, dmin [T, K/256, 32] and int8 scales / mins [T, K/32, 32] (csrc/qtile.h)."""
    t, nb = -(-n // TILE), k // GROUP
    codes = torch.empty(t, nb, LAYOUT_BYTES[layout_of(bits, compact)], dtype=torch.uint8)
    if ks:
        return codes, torch.empty(t, nb // 8, 2 * TILE, dtype=torch.float16), torch.empty(t, nb, 2 * TILE, dtype=torch.int8)
    s16, o16 = (torch.empty(t, nb, (2 if sub16 else 1) * TILE, dtype=torch.float16) for _ in range(2))
    return codes, s16, o16


def _attach(layer: nn.Module, codes: torch.Tensor, s16: torch.Tensor, o16: torch.Tensor, n: int, bits: int,
            sub16: bool, bias: torch.Tensor | None, zexp: int = 0, ks: bool = False) -> None:
    """zexp > 0: every offset is -2^zexp * its scale, so the offsets are dropped and the kernels compute them
    (with ks, o16 holds the integer scales: kept)."""
    layer.codes = nn.Parameter(codes, requires_grad=False)
    layer.s16 = nn.Parameter(s16, requires_grad=False)
    layer.o16 = nn.Parameter(o16 if not zexp or ks else torch.empty(0, dtype=torch.float16), requires_grad=False)
    layer.zexp, layer.ks = zexp, ks
    layer.n_out, layer.bits8, layer.sub16, layer.narrow = n, bits > 4, sub16, 4 < bits <= 6
    layer.five = codes.shape[2] == LAYOUT_BYTES[3]
    layer.act16 = True  # the exact two-part activations until set_act_bits (ember.load: 8 by default) says
    layer.bias = None if bias is None else nn.Parameter(bias.to(torch.bfloat16), requires_grad=False)


def pack_raw(layer: nn.Module, shards: list[RawTensor], bias: torch.Tensor | None, compact: bool = True) -> bool:
    """GGUF shards straight into tiles (ember_gguf_pack: decoded and packed a tile at a time, never a byte per
    weight in between). False, packing nothing, where a shard but the last ends inside a tile."""
    if any(s.shape[0] % TILE for s in shards[:-1]):
        return False
    n, k = sum(s.shape[0] for s in shards), shards[0].shape[1]
    bits, sub16 = max(KIND_BITS[s.kind] for s in shards), any(s.kind in GROUP16 for s in shards)
    ks, layout = compact and k_scales(shards), layout_of(bits, compact)
    codes, s16, o16 = _alloc(n, k, bits, sub16, ks, compact)
    row = 0
    for s in shards:
        raw = np.ascontiguousarray(s.data, dtype=np.uint8)
        t = row // TILE
        if ks:
            cpu_ops().ember_gguf_pack_ks(KIND_ID[s.kind], raw.ctypes.data, s.shape[0], k, layout,  # type: ignore[union-attr]
                                         codes[t].data_ptr(), s16[t].data_ptr(), o16[t].data_ptr())
        else:
            cpu_ops().ember_gguf_pack(KIND_ID[s.kind], raw.ctypes.data, s.shape[0], k,  # type: ignore[union-attr]
                                      layout, int(sub16), codes[t].data_ptr(), s16[t].data_ptr(),
                                      o16[t].data_ptr())
        row += s.shape[0]
    zexps = {ZERO_EXP.get(s.kind, 0) for s in shards}  # one symmetric kind (fused shards may mix kinds)
    _attach(layer, codes, s16, o16, n, bits, sub16, bias, zexps.pop() if len(zexps) == 1 else 0, ks)
    return True


def k_scales(shards: list[RawTensor]) -> bool:
    """Whether the layer can keep its K-quant scales as the file has them (csrc/qtile.h's ks: 0.5-0.56 bits a
    weight, not 1-2 as fp16 per 32 or 16): shards all Q4_K / Q5_K, or all Q6_K. Fused layers that mix Q6_K
    with others (Q4_K_M's q/k/v on some layers) keep fp16 scales."""
    kinds = {s.kind for s in shards}
    return kinds <= {"Q4_K", "Q5_K"} or kinds == {"Q6_K"}


def pack_chunks(layer: nn.Module, chunks: Iterable[Canonical], n: int, k: int, bits: int,
                bias: torch.Tensor | None, sub16: bool = False, compact: bool = True) -> None:
    """Row chunks of a [n, k] weight, packed one at a time into tensors allocated once (bounded load memory:
    one chunk's canonical codes beside the packed layer). bits: the widest code among the layer's shards
    (4: nibbles; more: a byte per code); sub16: some shard has a scale per 16 (Q6_K), so all scales go per 16."""
    codes, s16, o16 = _alloc(n, k, bits, sub16, compact=compact)
    row = 0
    chunks = (c.to_group16() if sub16 else c for c in chunks)  # one scale width, so carried rows concatenate
    for c in _whole_tiles(chunks):  # every chunk but the last holds whole tiles
        rows = c.q.shape[0]
        if row + rows > n or c.q.shape[1] != k:
            raise ValueError(f"weight chunks overrun the layer's [{n}, {k}]")
        at = slice(row // TILE, -(-(row + rows) // TILE))
        pack_tiles(c, codes[at], s16[at], o16[at])
        row += rows
    if row != n:
        raise ValueError(f"weight chunks hold {row} rows, the layer {n}")
    _attach(layer, codes, s16, o16, n, bits, sub16, bias)


def mode(layer: nn.Module) -> int:
    """The kernel's flags: 1 = codes wider than 4 bits, 2 = a scale per 16, 4 = the exact two-part activations,
    8 = 5-6 bit codes in the SIX layout (with 1), bits 4-7 = zexp: offsets -2^zexp * scale, not stored, 256 = K-quant
    scales (k_scales), 512 = 5-bit codes in the FIVE layout (with 1 and 8)."""
    return (int(layer.bits8) | 2 * int(layer.sub16) | 4 * int(getattr(layer, "act16", True))
            | 8 * int(getattr(layer, "narrow", False)) | getattr(layer, "zexp", 0) << 4
            | int(getattr(layer, "ks", False)) << 8 | int(getattr(layer, "five", False)) << 9)


ACT_BITS = (8, 16)
# Below this many weights in packed linears the exact mode is the default: there ember is ahead of llama.cpp
# with it already, and small models' narrow logit margins make int8's ~4x larger logit error flip greedy
# tokens (SmolLM2: 12 of 320 teacher-forced positions against 1; its first chat answer to "What is the
# capital of France?" turns into French repetition, as llama.cpp's does). At 1B+ the matmul is the bottleneck.
INT8_FROM_WEIGHTS = 900_000_000  # Gemma 3 1B holds 1.0e9 (its tied head included), Llama-3.2-1B 1.24e9

# The compact layouts (the file's K-quant scales; 5-bit codes in 5 bits) stream fewer bytes but take more
# instructions per block: from ~1B weights, where decode is bound by memory, they win (1B Q5_K_M decode
# +25 %, Q4_K_M +16 %, Q6_K +13 %, in-process A/B); below, a model's layers sit in cache and the extra
# unpacking costs (Gemma 3 270M decode -6 % each). Same threshold as the int8 activations.
COMPACT_FROM_WEIGHTS = INT8_FROM_WEIGHTS


def compact_layouts(weights: int) -> bool:
    """Whether a model with `weights` block-quantized weights packs them compactly; EMBER_COMPACT=0|1 decides
    instead where set (anything else is an error, not ignored)."""
    from ember.errors import ParameterError

    env = os.environ.get("EMBER_COMPACT")
    if env is None:
        return weights >= COMPACT_FROM_WEIGHTS
    if env not in ("0", "1"):
        raise ParameterError(f"EMBER_COMPACT={env!r} is invalid: 1 (the file's K-quant scales, 5-bit codes in 5 "
                             "bits: fewer bytes per decode step) or 0 (the wider layouts); unset, 1 for models of "
                             "1B+ weights and 0 below")
    return env == "1"


def act_bits_of(value: int | None) -> int | None:
    """ember.load(act_bits=...) or, when not given, $EMBER_ACT_BITS; None: neither (default_act_bits decides).
    Anything but 8 or 16 is an error."""
    from ember.errors import ParameterError

    if value is None:
        env = os.environ.get("EMBER_ACT_BITS")
        if env is not None and env not in ("8", "16"):
            raise ParameterError(f"EMBER_ACT_BITS={env!r} is invalid: 8 (int8 activations per block of 32, "
                                 "llama.cpp's numerics: faster) or 16 (two int8 parts, ~16 bits: exact); unset, "
                                 "8 for models of 1B+ weights and 16 below")
        return None if env is None else int(env)
    if value not in ACT_BITS or isinstance(value, bool):
        raise ParameterError(f"act_bits={value!r} is invalid: 8 (int8 activations per block of 32, llama.cpp's "
                             "numerics: faster) or 16 (two int8 parts per block, ~16 bits: exact); None (the "
                             "default): 8 for models of 1B+ weights and 16 below")
    return value


def packed_layers(model: nn.Module) -> Iterator[nn.Module]:
    """The model's linears whose weights this module packed."""
    return (m for m in model.modules() if hasattr(m, "codes") and hasattr(m, "s16"))


def packed_weights(model: nn.Module) -> int:
    """How many weights the model's packed linears hold."""
    return sum(m.n_out * m.codes.shape[1] * GROUP for m in packed_layers(model))


def default_act_bits(model: nn.Module) -> int:
    return 8 if packed_weights(model) >= INT8_FROM_WEIGHTS else 16


def set_act_bits(model: nn.Module, bits: int) -> None:
    """Every packed linear of the model quantizes its activations to `bits` (8 or 16)."""
    for m in packed_layers(model):
        m.act16 = bits == 16


def act_bits_in(model: nn.Module) -> int | None:
    """The activation mode of the model's packed linears (None: it has none)."""
    modes = {m.act16 for m in packed_layers(model)}
    return None if not modes else 16 if modes == {True} else 8


def _w(layer: nn.Module) -> tuple:
    return layer.codes.data_ptr(), mode(layer), layer.s16.data_ptr(), layer.o16.data_ptr()


def matmul(layer: nn.Module, x: torch.Tensor, n: int, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x [M, K] bf16 or fp32 (contiguous) -> x @ W.T [M, N] in out_dtype (bf16 or fp32)."""
    m, k = x.shape
    y = torch.empty(m, n, dtype=out_dtype)
    f32 = out_dtype == torch.float32
    cpu_ops().ember_qtile_matmul(*_w(layer), x.data_ptr(), int(x.dtype == torch.float32), m, n, k,  # type: ignore[union-attr]
                                 y.data_ptr() if f32 else None, None if f32 else y.data_ptr(),
                                 int(m > MAX_GEMV_ROWS and amx_available()))
    return y


def rows_f32(layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Weight rows `ids` [n] (any order) in fp32 [n, K], computed q * s + o as gguf-py does (bit for bit for the
    group-32 kinds; for Q6_K gguf-py's (q - 32) * s may differ in the last bit)."""
    ids = ids.to(torch.int64).contiguous()
    k = layer.codes.shape[1] * GROUP
    out = torch.empty(ids.shape[0], k)
    cpu_ops().ember_qtile_rows_f32(*_w(layer), ids.data_ptr(), ids.shape[0], k, out.data_ptr())  # type: ignore[union-attr]
    return out


class PackedBlocksMethod(QuantMethod):
    """GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K on ember's int8 tile kernel."""

    name = "packed"

    def __init__(self, compact: bool = True) -> None:
        self.compact = compact  # see compact_layouts

    def pack(self, layer: nn.Module, shards: list[RawTensor], bias: torch.Tensor | None,
             dtype: torch.dtype, device: torch.device) -> None:
        if pack_raw(layer, shards, bias, self.compact):
            return
        pack_chunks(layer, gguf_chunks(shards), sum(s.shape[0] for s in shards), shards[0].shape[1],
                    max(KIND_BITS[s.kind] for s in shards), bias, any(s.kind in GROUP16 for s in shards),
                    self.compact)

    rows_f32 = staticmethod(rows_f32)  # a tied embedding and the head's exact top candidates read the tiles

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return kernel_apply(layer, x, lambda rows, out_dtype: matmul(layer, rows, layer.n_out, out_dtype))


def packed_ok(shards: list[RawTensor], dtype: torch.dtype, device: torch.device) -> bool:
    return (device.type == "cpu" and dtype == torch.bfloat16 and available()
            and all(s.kind in DECODERS and len(s.shape) == 2 and s.shape[1] % GROUP == 0 for s in shards))
