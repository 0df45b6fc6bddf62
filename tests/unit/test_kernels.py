"""ember's fused C kernels (kernels/csrc/cpu_ops.c) against the plain PyTorch path they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ember.kernels import cpu_ops, ops
from ember.quant import packed
from ember.quant.gguf_blocks import Canonical

pytestmark = pytest.mark.skipif(cpu_ops() is None, reason="no C compiler: the kernels are off")
BF = torch.bfloat16


@pytest.fixture
def torch_only(monkeypatch):
    """Run ops.* on their PyTorch fallback."""
    monkeypatch.setattr(ops, "cpu_ops", lambda: None)


def _both(fn, monkeypatch):
    fast = fn()
    monkeypatch.setattr(ops, "cpu_ops", lambda: None)
    slow = fn()
    monkeypatch.undo()
    return fast, slow


@pytest.mark.parametrize("post", [False, True])
@pytest.mark.parametrize("out_dtype", [BF, torch.float32])
def test_add_rmsnorm_matches_torch(monkeypatch, post, out_dtype):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 96, generator=g) * 3
    delta = torch.randn(5, 96, generator=g).to(BF)
    w, pw = torch.rand(96, generator=g) + 0.5, torch.rand(96, generator=g) + 0.5

    def run():
        x = x0.clone()
        y = ops.add_rmsnorm(x, delta, w, 1e-6, out_dtype, pw if post else None)
        return x, y

    (xf, yf), (xs, ys) = _both(run, monkeypatch)
    torch.testing.assert_close(xf, xs, rtol=1e-6, atol=1e-5)  # the residual stream itself
    assert yf.dtype == ys.dtype == out_dtype
    torch.testing.assert_close(yf.float(), ys.float(), rtol=1e-2 if out_dtype == BF else 1e-5, atol=1e-5)


@pytest.mark.parametrize("norms", [False, True])
@pytest.mark.parametrize("rot", [32, 16])  # full and partial rotary (Dh 32)
def test_rope_store_matches_torch(monkeypatch, norms, rot):
    g = torch.Generator().manual_seed(1)
    t, nq, nkv, dh = 4, 6, 2, 32
    qkv0 = torch.randn(t, nq + 2 * nkv, dh, generator=g).to(BF)
    pos = torch.tensor([0, 5, 6, 100])
    inv = 1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)
    ang = pos[:, None].float() * inv[None]
    cos, sin = ang.cos(), ang.sin()
    qn, kn = (torch.rand(dh, generator=g) + 0.5, torch.rand(dh, generator=g) + 0.5) if norms else (None, None)
    slots = torch.tensor([3, 9, 10, 1])

    def run():
        qkv, kc, vc = qkv0.clone(), torch.zeros(nkv, 16, dh, dtype=BF), torch.zeros(nkv, 16, dh, dtype=BF)
        ops.rope_store(qkv, nq, nkv, cos, sin, kc, vc, slots, qn, kn, 1e-6)
        return qkv, kc, vc

    fast, slow = _both(run, monkeypatch)
    for a, b in zip(fast, slow, strict=True):
        # the kernel rotates in fp32 and rounds once; torch rounds cos/sin and each product to bf16
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0.05 * b.float().abs().max().item())
    assert torch.equal(fast[2][:, slots], qkv0[:, nq + nkv :].transpose(0, 1))  # v stored as is
    assert not fast[1][:, 0].any()  # untouched slots stay untouched


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_act_mul_matches_torch(monkeypatch, act):
    gu = (torch.randn(3, 2 * 200, generator=torch.Generator().manual_seed(2)) * 4).to(BF)
    fast, slow = _both(lambda: ops.act_mul(gu, act), monkeypatch)
    torch.testing.assert_close(fast.float(), slow.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("window,softcap,dh,h", [(None, None, 64, 8), (5, None, 64, 6), (None, 20.0, 64, 8),
                                                 (None, None, 48, 10), (5, None, 256, 8), (150, None, 64, 6)])
def test_decode_attention_matches_sdpa(window, softcap, dh, h):
    """Against softmax attention in fp32; 300 keys span three chunks of the kernel (merged by log-sum-exp),
    and each sequence's output is the same bits alone as in the batch (its chunks depend on it alone)."""
    g = torch.Generator().manual_seed(3)  # dh % 32 == 0: bf16 dot products; 48: plain loops
    hkv, slots_n = 2, 320  # h / hkv = 3, 4 or 5 query heads per kv head
    kc = torch.randn(hkv, slots_n, dh, generator=g).to(BF)
    vc = torch.randn(hkv, slots_n, dh, generator=g).to(BF)
    tables = [torch.randperm(slots_n, generator=g)[:n] for n in (1, 9, 30, 300)]  # scattered pages
    lens = torch.tensor([len(t) for t in tables])
    padded = torch.nn.utils.rnn.pad_sequence(tables, batch_first=True)
    q = torch.randn(4, h, dh, generator=g).to(BF)
    out = ops.decode_attention(q, kc, vc, padded, lens, 0.125, window, softcap)
    for i, t in enumerate(tables):
        alone = ops.decode_attention(q[i : i + 1], kc, vc, padded[i : i + 1, : len(t)], lens[i : i + 1], 0.125,
                                     window, softcap)
        assert torch.equal(alone[0], out[i])
        t = t[-window:] if window else t
        k, v = kc[:, t].float().repeat_interleave(h // hkv, 0), vc[:, t].float().repeat_interleave(h // hkv, 0)
        s = (q[i].float()[:, None] @ k.transpose(1, 2)) * 0.125  # [H, 1, n]
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        ref = (s.softmax(-1) @ v)[:, 0]  # [H, Dh]
        torch.testing.assert_close(out[i].float(), ref, rtol=0, atol=0.02)


def _canonical(n: int, k: int, bits: int, seed: int, group: int = 32) -> Canonical:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=g)
    scale = (torch.rand(n, k // group, generator=g) * 0.01 + 1e-3).half().float()  # fp16-exact, as GGUF stores them
    offset = (-torch.rand(n, k // group, generator=g) * 2**bits * 0.005).half().float()
    return Canonical(q, scale, offset, bits)


def _q8(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Activations as the int8 mode sees them: per block of 32 (256 for Q6_K's file scales, llama.cpp's Q8_K),
    round(x / d) * d with d = max|x| / 127."""
    b = x.double().view(x.shape[0], -1, block)
    d = b.abs().amax(-1, keepdim=True) / 127
    return (torch.round(b / torch.where(d > 0, d, 1)) * d).view(x.shape)


@pytest.mark.skipif(not packed.available(), reason="needs the tile kernel (AVX2 or AVX512)")
@pytest.mark.parametrize("bits,group", [(4, 32), (5, 32), (6, 32), (8, 32), (6, 16), (4, 16)])
@pytest.mark.parametrize("k", [576, 96, 512])
@pytest.mark.parametrize("act_bits", [8, 16])
def test_tile_matmul(bits, group, k, act_bits):
    """Against float64 references with a ragged last tile of weight rows (N = 70). act_bits=8: exactly the
    int8-quantized activations times W (every block sum an exact integer, only the fp32 epilogue rounds);
    act_bits=16: the two-part split keeps ~16 bits, so the result is close to x @ W.T itself. Reading rows
    back is exact. group 16: a scale per 16 (Q6_K). With W = u s + o per block, the int8 mode computes
    s d sum(u h) + o d sum(h): the offsets meet the quantized block sums too, so the result is W x^ (with the
    exact sums, o sum(x), the rounding error met the uncentred codes u: perplexity +1.5 % on SmolLM2)."""
    c = _canonical(70, k, bits, bits, group)
    layer = nn.Module()
    packed.pack_chunks(layer, [c], *c.q.shape, bits, None, sub16=group == 16)
    layer.act16 = act_bits == 16
    w = c.dequantize()  # [N, K] fp32 reference weights
    ids = torch.tensor([69, 0, 33, 16, 15])
    assert torch.equal(packed.rows_f32(layer, ids), w[ids])  # every code, scale and offset survives packing
    g = c.q.shape[1] // c.scale.shape[1]  # k per scale
    assert torch.equal(w.double(), c.q.double() * c.scale.double().repeat_interleave(g, 1)
                       + c.offset.double().repeat_interleave(g, 1))  # W = u s + o, exact in fp32

    def want(x: torch.Tensor) -> torch.Tensor:  # Q6_K's codes with a scale per 16: activations per 256 (Q8_K)
        q8k = group == 16 and k % 256 == 0 and bits > 5
        return (x.double() if act_bits == 16 else _q8(x, 256 if q8k else 32)) @ w.double().t()

    for m in (1, 3, 8, 13, 40):  # the gemv (<= 4 rows at a time) and, with AMX, the tile kernel
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        ref = x.double() @ w.double().t()
        y = packed.matmul(layer, x, 70, torch.float32)
        tol = 2e-4 if act_bits == 16 else 2e-6
        torch.testing.assert_close(y.double(), want(x), rtol=0, atol=tol * ref.abs().max().item())
        if act_bits == 8:  # and it is not the 16-bit answer: the mode really changed
            assert not torch.allclose(y.double(), ref, rtol=0, atol=2e-4 * ref.abs().max().item())
        yb = packed.PackedBlocksMethod().apply(layer, x.to(BF))  # bf16 in and out, as the model runs it
        assert yb.shape == (m, 70) and yb.dtype == BF
        torch.testing.assert_close(yb.double(), want(x.to(BF).float()), rtol=0, atol=8e-3 * ref.abs().max().item())


@pytest.mark.skipif(not packed.available(), reason="needs the tile kernel (AVX2 or AVX512)")
@pytest.mark.parametrize("bits,group", [(4, 32), (8, 32), (6, 16)])
@pytest.mark.parametrize("m", [5, 16, 17, 70])
@pytest.mark.parametrize("act_bits", [8, 16])
def test_batched_rows_equal_single_rows(bits, group, m, act_bits, monkeypatch):
    """Each row's result is the same bits whatever else is in the batch and whichever kernel runs it
    (the gemv for a few rows, AMX-INT8 for many): batched output equals single output."""
    c = _canonical(50, 256, bits, bits + m, group)  # K = 256: a scale per 16 takes activations per 256 (Q8_K)
    layer = nn.Module()
    packed.pack_chunks(layer, [c], *c.q.shape, bits, None, sub16=group == 16)
    layer.act16 = act_bits == 16
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(BF)
    batched = packed.matmul(layer, x, 50, torch.float32)
    for i in (0, m // 2, m - 1):
        assert torch.equal(packed.matmul(layer, x[i : i + 1], 50, torch.float32)[0], batched[i])
    monkeypatch.setattr(packed, "MAX_GEMV_ROWS", 1 << 30)  # every row on the gemv
    assert torch.equal(packed.matmul(layer, x, 50, torch.float32), batched)


@pytest.mark.skipif(not packed.available(), reason="needs the tile kernel (AVX2 or AVX512)")
def test_packed_scales_round_as_torch_half():
    """Packing rounds fp32 scales / offsets to fp16 as torch does: ties to even, subnormals, overflow to inf."""
    edge = torch.tensor([0.0, -0.0, 1.0, 1 + 2**-11, 1 + 3 * 2**-11, 65504.0, 65519.0, 65520.0, -1e9, 2**-24,
                         2**-25, 3 * 2**-26, 2**-14 - 2**-26, 6e-5, -3.3e-7, 1e-10, float("inf"), float("nan")])
    vals = torch.cat((edge, torch.randn(110) * 10.0 ** torch.randint(-9, 5, (110,)).float()))  # [128]
    c = Canonical(torch.zeros(16, 256, dtype=torch.uint8), vals.view(16, 8), -vals.view(16, 8), 4)
    codes, s16, o16 = torch.empty(1, 8, 256, dtype=torch.uint8), *torch.empty(2, 1, 8, 16, dtype=torch.half)
    packed.pack_tiles(c, codes, s16, o16)  # [1 tile, 8 blocks, 16 rows]
    want = vals.view(16, 8).t().half()
    assert torch.equal(s16[0].view(torch.int16), want.view(torch.int16))
    assert torch.equal(o16[0].view(torch.int16), (-want).view(torch.int16))


def test_zero_activation_block():
    """A block of zeros (max |x| = 0) must give 0, not NaN."""
    if not packed.available():
        pytest.skip("needs the tile kernel (AVX2 or AVX512)")
    c = _canonical(16, 64, 4, 1)
    layer = nn.Module()
    packed.pack_chunks(layer, [c], *c.q.shape, 4, None)
    x = torch.zeros(1, 64)
    x[0, 40] = 1.0
    torch.testing.assert_close(packed.matmul(layer, x, 16, torch.float32)[0], c.dequantize()[:, 40])


def test_no_compiler_falls_back(monkeypatch, torch_only):
    x = torch.randn(2, 8)
    y = ops.add_rmsnorm(x, None, torch.ones(8), 1e-6, torch.float32)
    torch.testing.assert_close(y, F.rms_norm(x, (8,), torch.ones(8), 1e-6))


@pytest.mark.parametrize("n", [49152, 37, 5])
def test_topk_and_argmax_match_torch(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(6, n, generator=g)
    x[1, 3] = x[1, min(n - 1, 20)] = 50.0  # a tie at the top: the first index wins, as in torch
    x[2] = -float("inf")
    x[2, n - 1] = 0.0
    k = min(16, n)
    idx = ops.topk_indices(x, k)
    # the same k values in the same order (which of equal values is taken is free, as in torch)
    assert torch.equal(x.gather(1, idx), x.topk(k, dim=-1).values)
    assert idx[1, :2].tolist() == [3, min(n - 1, 20)] and idx[2, 0] == n - 1
    assert all(len(set(r)) == k for r in idx.tolist())  # no index twice
    assert torch.equal(ops.argmax(x), x.argmax(dim=-1))
    for at in (0, n // 2, n - 1):  # a NaN row falls back to torch (NaN counts as the maximum there),
        y = x.clone()  # wherever the NaN sits: the first k, the vector body, the tail
        y[4, at] = float("nan")
        assert torch.equal(ops.argmax(y), y.argmax(dim=-1))
        assert torch.equal(ops.topk_indices(y, k)[4], y.topk(k, dim=-1).indices[4])


@pytest.mark.skipif(not packed.available(), reason="needs the tile kernel (AVX2 or AVX512)")
@pytest.mark.parametrize("kinds", [("Q4_K",), ("Q5_K",), ("Q6_K",), ("Q4_K", "Q5_K")])
@pytest.mark.parametrize("act_bits", [8, 16])
def test_k_quant_scales_as_the_file_has_them(kinds, act_bits):
    """Q4_K / Q5_K / Q6_K layers keep fp16 d, dmin per 256 and the integer scales and mins (packed.k_scales): the
    weights read back bit for bit as gguf-py dequantizes them (fp16 scales per 32 could not hold d sc), and the
    matmul is W x^ (int8 mode) or close to x W.T (exact mode) for W itself, on 1-40 rows and a ragged last tile."""
    from gguf import GGMLQuantizationType, quants

    from ember.weights.base import RawTensor
    from tests.unit.test_gguf_blocks import _random_blocks

    k = 512
    shards, ws = [], []
    for i, kind in enumerate(kinds):
        rows = 32 if i < len(kinds) - 1 else 21
        raw = _random_blocks(kind, rows, k, seed=i + 5)
        shards.append(RawTensor(f"w{i}", kind, (rows, k), raw, lambda a: a))
        ws.append(torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[kind]).reshape(rows, k).copy()))
    w = torch.cat(ws)  # [N, K] fp32, gguf-py's numbers
    n = w.shape[0]
    layer = nn.Module()
    assert packed.k_scales(shards) and packed.pack_raw(layer, shards, None) and layer.ks
    assert layer.s16.numel() * 2 + layer.o16.numel() < n * k * 0.6 / 8 + 64 * 33  # ~0.56 bits a weight, not 1-2
    assert torch.equal(packed.rows_f32(layer, torch.arange(n)), w)
    layer.act16 = act_bits == 16
    for m in (1, 3, 8, 13, 40):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        ref = x.double() @ w.double().t()
        want = (x.double() if act_bits == 16 else _q8(x, 256 if kinds == ("Q6_K",) else 32)) @ w.double().t()
        y = packed.matmul(layer, x, n, torch.float32)
        tol = 2e-4 if act_bits == 16 else 2e-6
        torch.testing.assert_close(y.double(), want, rtol=0, atol=tol * ref.abs().max().item())
        assert torch.equal(packed.matmul(layer, x[-1:], n, torch.float32)[0], y[-1])  # a row alone: same bits
