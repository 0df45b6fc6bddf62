"""GGUF block decoders: bit-exact against gguf-py's dequantizers, on random blocks and real tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from ember.kernels import cpu_ops
from ember.quant import gguf_blocks, packed
from ember.quant.gguf_blocks import DECODERS, decode
from ember.weights.gguf import GGUFFile

KINDS = sorted(DECODERS)


def _random_blocks(kind: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random raw bytes in `kind`'s layout, with finite f16 scales (random bytes could be inf/nan)."""
    qtype = GGMLQuantizationType[kind]
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    at, n_f16 = {"Q4_0": (0, 1), "Q8_0": (0, 1), "Q5_0": (0, 1), "Q4_1": (0, 2), "Q5_1": (0, 2), "Q4_K": (0, 2),
                 "Q5_K": (0, 2), "Q6_K": (208, 1)}[kind]  # where the f16 scales sit in a block
    halves = rng.uniform(-2, 2, (rows, cols // block, n_f16)).astype(np.float16)
    raw[..., at : at + 2 * n_f16] = halves.view(np.uint8).reshape(rows, cols // block, 2 * n_f16)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", KINDS)
def test_random_blocks_bit_exact(kind):
    rows, cols = 8, 512
    raw = _random_blocks(kind, rows, cols, seed=hash(kind) % 1000)
    want = quants.dequantize(raw, GGMLQuantizationType[kind]).reshape(rows, cols)
    c = decode(kind, raw, (rows, cols))
    got = c.dequantize().numpy()
    # equal as numbers, bit for bit except the sign of zero (d * (q - 8) gives -0.0 where q*d - 8d gives +0.0)
    assert np.array_equal(got, want) and got.dtype == want.dtype
    assert int(c.q.max()) < 2**c.bits


@pytest.mark.skipif(cpu_ops() is None, reason="no C compiler: decoding runs on PyTorch only")
@pytest.mark.parametrize("kind", KINDS)
def test_c_decoder_equals_torch_decoder(kind, monkeypatch):
    """decode() runs C when the kernels are built; the PyTorch decoders (the fallback) give the same bits,
    nan and inf scales included (random bytes)."""
    raw = np.random.default_rng(7).integers(0, 256, (40, 4 * GGML_QUANT_SIZES[GGMLQuantizationType[kind]][1]),
                                            dtype=np.uint8)
    shape = (40, 4 * GGML_QUANT_SIZES[GGMLQuantizationType[kind]][0])
    fast = decode(kind, raw, shape)
    monkeypatch.setattr(gguf_blocks, "cpu_ops", lambda: None)
    slow = decode(kind, raw, shape)
    assert torch.equal(fast.q, slow.q) and fast.zero == slow.zero and fast.bits == slow.bits
    for a, b in ((fast.scale, slow.scale), (fast.offset, slow.offset)):
        nan = a.isnan()
        assert torch.equal(nan, b.isnan()) and nan.any()  # NaN where NaN (torch makes every NaN 0x7fffffff)
        assert torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))  # same bits, -0.0 included


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_roundtrip_bit_exact(kind):
    """Blocks made by gguf-py's own quantizer (realistic scales), where it has one."""
    qtype = GGMLQuantizationType[kind]
    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    try:
        raw = quants.quantize(x, qtype)
    except NotImplementedError:
        pytest.skip(f"gguf-py cannot quantize {kind}")
    want = quants.dequantize(raw, qtype)
    got = decode(kind, raw, (4, 256)).dequantize().numpy()
    assert np.array_equal(got, want)


def _real_tensor_check(path, limit_per_kind=2):
    f = GGUFFile(path)
    seen: dict[str, int] = {}
    for raw in f.raw_tensors():
        if raw.kind not in DECODERS or len(raw.shape) != 2 or seen.get(raw.kind, 0) >= limit_per_kind:
            continue
        seen[raw.kind] = seen.get(raw.kind, 0) + 1
        rows = raw.data[:64]  # the first 64 rows keep the test quick
        want = quants.dequantize(np.ascontiguousarray(rows), GGMLQuantizationType[raw.kind])
        got = decode(raw.kind, rows, (rows.shape[0], raw.shape[1])).dequantize()
        assert torch.equal(got, torch.from_numpy(want.reshape(got.shape))), raw.name
    return seen


def test_real_tensors_smollm2(smollm_gguf):
    assert set(_real_tensor_check(smollm_gguf)) == {"Q4_1", "Q8_0"}


def test_real_tensors_gemma3(gemma_gguf):
    assert {"Q4_K", "Q5_0", "Q8_0"} <= set(_real_tensor_check(gemma_gguf))


@pytest.mark.skipif(not packed.available(), reason="needs ember's kernels")
@pytest.mark.parametrize("kinds", [("Q4_K",), ("Q4_0", "Q4_0", "Q8_0"), ("Q4_K", "Q4_K", "Q6_K"), ("Q5_1", "Q6_K"),
                                   ("Q6_K",), ("Q5_K", "Q4_1")])
@pytest.mark.parametrize("compact", [False, True])
def test_raw_tiles_equal_decode_then_pack(kinds, compact):
    """GGUF rows straight into tiles (one pass, the load's fast path) give the same bytes as decoding to the
    canonical form and packing it: fused shards of mixed kinds (byte codes, scales per 16), a ragged last
    tile, nan / inf scales from random bytes; both layout sets (packed.compact_layouts). (Compact K-quant layers
    keep their integer scales, which the canonical form has not: their codes are compared here, their weights
    in test_kernels.py's test_k_quant_scales_as_the_file_has_them.)"""
    from torch import nn

    from ember.quant.int4 import gguf_chunks
    from ember.weights.base import RawTensor

    k = 512
    rng = np.random.default_rng(len(kinds))
    shards = []
    for i, kind in enumerate(kinds):
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
        rows = 32 if i < len(kinds) - 1 else 21  # the last shard ends inside a tile
        raw = rng.integers(0, 256, (rows, k // block * size), dtype=np.uint8)
        shards.append(RawTensor(f"w{i}", kind, (rows, k), raw, lambda a: a))
    fast, slow = nn.Module(), nn.Module()
    assert packed.pack_raw(fast, shards, None, compact)
    n = sum(s.shape[0] for s in shards)
    bits = max(gguf_blocks.KIND_BITS[s.kind] for s in shards)
    packed.pack_chunks(slow, gguf_chunks(shards), n, k, bits, None, any(s.kind in gguf_blocks.GROUP16 for s in shards),
                       compact)
    assert fast.ks == (compact and packed.k_scales(shards))
    for name in ("codes",) if fast.ks else ("codes", "s16", "o16") if not fast.zexp else ("codes", "s16"):
        a, b = getattr(fast, name), getattr(slow, name)
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    assert (fast.bits8, fast.sub16, fast.n_out) == (slow.bits8, slow.sub16, slow.n_out)
    zexps = {gguf_blocks.ZERO_EXP.get(kind, 0) for kind in kinds}
    assert fast.zexp == (zexps.pop() if len(zexps) == 1 else 0)  # symmetric kinds alone drop their offsets
    if fast.zexp:  # ... which were exactly -2^zexp * scale, wherever both are normal fp16 numbers
        s, o = slow.s16.float(), slow.o16.float()
        normal = (s.abs() >= 2**-14) & (o.abs() <= 65504) & s.isfinite()
        assert normal.float().mean() > 0.2 and torch.equal(o[normal], -(2.0**fast.zexp) * s[normal])
    ragged = [RawTensor("a", "Q4_0", (20, k), shards[0].data[:20], lambda a: a), shards[-1]]
    assert not packed.pack_raw(nn.Module(), ragged, None)  # a shard ending inside a tile: the chunked path


@pytest.mark.skipif(not packed.available(), reason="needs ember's kernels")
@pytest.mark.parametrize("kind", sorted(gguf_blocks.ZERO_EXP))
def test_symmetric_kinds_need_no_offsets(kind, monkeypatch):
    """Q4_0, Q5_0, Q8_0 and Q6_K weights are d (q - z) with z a power of two: their tiles drop the offsets (a
    quarter to a half of a Q4_0 / Q6_K layer's streamed scale bytes) and the kernels compute -z s, giving the
    same bits as the stored offsets, in the matmul (gemv and, where there is AMX, the tile kernel) and in the
    rows read back (embeddings)."""
    from torch import nn

    from ember.weights.base import RawTensor

    n, k = 40, 512
    shard = RawTensor("w", kind, (n, k), _random_blocks(kind, n, k, 3), lambda a: a)
    sym, stored = nn.Module(), nn.Module()
    assert packed.pack_raw(sym, [shard], None, compact=False)  # fp16 scales (Q6_K's integer ones: compact)
    monkeypatch.setattr(packed, "ZERO_EXP", {})
    assert packed.pack_raw(stored, [shard], None, compact=False)
    assert sym.zexp == gguf_blocks.ZERO_EXP[kind] and sym.o16.numel() == 0 and stored.zexp == 0
    assert stored.o16.numel() == stored.s16.numel()
    ids = torch.arange(n).flip(0)
    assert torch.equal(packed.rows_f32(sym, ids), packed.rows_f32(stored, ids))
    torch.testing.assert_close(packed.rows_f32(sym, ids), decode(kind, shard.data, (n, k)).dequantize()[ids],
                               rtol=2e-3, atol=1e-6)  # and they are the weights (scales rounded to fp16)
    for m in (1, 3, 17, 40):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        for act16 in (True, False):
            sym.act16 = stored.act16 = act16
            assert torch.equal(packed.matmul(sym, x, n, torch.float32), packed.matmul(stored, x, n, torch.float32))


@pytest.mark.skipif(not packed.available(), reason="needs ember's kernels")
@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_k_scale_tiles_hold_the_same_codes(kind):
    """The K-quant packer (codes straight from the raw words, the load's fast path) writes the same code bytes as
    decoding to the canonical form and packing: whole tiles and a ragged last one."""
    from torch import nn

    from ember.weights.base import RawTensor

    n, k = 37, 512
    shard = RawTensor("w", kind, (n, k), _random_blocks(kind, n, k, 4), lambda a: a)
    ks, plain = nn.Module(), nn.Module()
    assert packed.pack_raw(ks, [shard], None) and ks.ks
    assert packed.pack_raw(plain, [shard], None, compact=False) and not plain.ks
    assert torch.equal(ks.codes, plain.codes)


@pytest.mark.skipif(not packed.available(), reason="needs ember's kernels")
@pytest.mark.parametrize("kind", ["Q4_K", "Q8_0", "Q6_K"])
def test_packed_embedding_rows_are_gguf_py_rows(kind):
    """An untied token embedding is kept in the matmul's tiles (not a byte per code): looked-up rows are
    gguf-py's dequantized rows, bit for bit."""
    from ember.layers.embedding import Embedding
    from ember.weights.base import RawTensor

    v, d = 40, 512
    raw = _random_blocks(kind, v, d, 6)
    emb = Embedding(v, d)
    emb.load(RawTensor("token_embd.weight", kind, (v, d), raw, lambda a: a), torch.bfloat16, torch.device("cpu"),
             packed=True)
    assert emb.codes is None and emb.table.codes.shape[0] == -(-v // 16)  # tiles, not canonical codes
    ids = torch.tensor([39, 0, 17, 17, 5])
    want = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[kind]).reshape(v, d).copy())[ids]
    assert torch.equal(emb(ids), want)
