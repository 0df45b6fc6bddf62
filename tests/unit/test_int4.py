"""Packed int4 path: GGUF blocks -> kernel planes (exact), linear vs dense reference, exact head refinement."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from ember.layers.linear import Linear
from ember.layers.logits import TopRefiner, canonical_rows
from ember.quant import packed
from ember.quant.gguf_blocks import GROUP, decode
from ember.quant.int4 import INT4_KINDS, Int4Method, kernel_available, to_planes
from ember.quant.packed import PackedBlocksMethod
from ember.weights.base import RawTensor
from tests.unit.test_gguf_blocks import _random_blocks

KINDS = sorted(INT4_KINDS)  # torch's int4 kernel: one scale per 32 (Q6_K runs on ember's kernel or dense)
pytestmark = pytest.mark.skipif(not kernel_available(), reason="this torch has no CPU int4 kernel")


def _raw(kind: str, rows: int, cols: int, seed: int) -> RawTensor:
    from gguf import GGMLQuantizationType, quants

    data = _random_blocks(kind, rows, cols, seed)
    return RawTensor(f"w.{kind}", kind, (rows, cols), data,
                     lambda a, k=kind: quants.dequantize(a, GGMLQuantizationType[k]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("planes", [1, 2])
def test_planes_reconstruct_the_weights(kind, planes):
    c = decode(kind, _random_blocks(kind, 4, 256, 3), (4, 256))
    if c.bits > 4 and planes == 1:
        pytest.skip("a 5/8-bit code needs two planes")
    q, s, z = to_planes(c, planes)
    assert q.min() >= 0 and q.max() <= 15 and q.shape == (4, 256 * planes)
    g = q.view(4, -1, GROUP).double()
    w = ((g - 8) * s.double()[..., None] + z.double()[..., None]).view(4, planes, 256).sum(1)  # planes add up
    assert torch.allclose(w, c.dequantize().double(), rtol=0, atol=1e-5 * c.dequantize().abs().max().item())


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_scales_and_zeros_lose_no_more_than_bf16_weights(kind):
    """The kernel takes scales and zeros in bf16: the planes must stay as close to the codes as a bf16 copy
    of the weights (a large zero, e.g. o + 136s for 5-bit codes, would round off a quarter step)."""
    c = decode(kind, _random_blocks(kind, 8, 256, 3), (8, 256))
    planes = 2 if c.bits > 4 else 1
    q, s, z = to_planes(c, planes)
    g = q.view(8, -1, GROUP).double()
    s, z = s.bfloat16().double()[..., None], z.bfloat16().double()[..., None]
    w = ((g - 8) * s + z).view(8, planes, 256).sum(1)
    ref = c.dequantize().double()
    assert (w - ref).abs().max() <= 1.25 * (ref.bfloat16().double() - ref).abs().max()


def test_fused_linear_with_mixed_kinds_matches_dense(cpu_backend):
    """q in Q4_K, k in Q5_0 and v in Q8_0: one fused matmul (ember's kernel: byte codes for all three;
    torch's int4 kernel: 2 planes)."""
    shards = [_raw("Q4_K", 64, 256, 1), _raw("Q5_0", 32, 256, 2), _raw("Q8_0", 32, 256, 3)]
    lin = Linear(256, [64, 32, 32], bias=True, shards=("q", "k", "v"))
    for name, raw in zip("qkv", shards, strict=True):
        lin.load(name, raw)
        lin.load(name, RawTensor("b", "F32", (raw.shape[0],), np.ones((1, raw.shape[0]), np.float32) * 0.5,
                                 lambda a: a.view(np.float32)), is_bias=True)
    lin.finalize(torch.bfloat16, torch.device("cpu"))
    if cpu_backend == "kernels":
        assert isinstance(lin.method, PackedBlocksMethod) and lin.bits8
    else:
        assert isinstance(lin.method, Int4Method) and lin.planes == 2
    w = torch.cat([s.dequantize() for s in shards])  # [128, 256] reference weights
    x = torch.randn(5, 256)
    ref = x.to(torch.bfloat16).float() @ w.T + 0.5
    got = lin(x.to(torch.bfloat16)).float()
    err = (got - ref).abs().max() / ref.abs().max()
    assert err < 0.02, err  # bf16 activations and scales; the codes themselves are exact


def test_fused_linear_with_q6_k_shard(cpu_backend):
    """Q4_K_M files mix Q6_K (a scale per 16) into fused q/k/v: ember's kernel takes the whole layer with a
    scale per 16; without the kernels such a layer runs dense."""
    shards = [_raw("Q4_K", 64, 256, 1), _raw("Q6_K", 32, 256, 2), _raw("Q8_0", 48, 256, 3)]
    lin = Linear(256, [64, 32, 48], shards=("q", "k", "v"))
    for name, raw in zip("qkv", shards, strict=True):
        lin.load(name, raw)
    lin.finalize(torch.bfloat16, torch.device("cpu"))
    if cpu_backend == "kernels":
        assert isinstance(lin.method, PackedBlocksMethod) and lin.sub16 and lin.bits8
    else:
        assert lin.method.name == "dense"
    w = torch.cat([s.dequantize() for s in shards])  # [144, 256] reference weights
    x = torch.randn(5, 256)
    ref = x.to(torch.bfloat16).float() @ w.T
    err = (lin(x.to(torch.bfloat16)).float() - ref).abs().max() / ref.abs().max()
    assert err < 0.02, err


def test_int4_is_not_used_for_fp32_or_unsupported_kinds():
    lin = Linear(256, 64)
    lin.load("", _raw("Q4_0", 64, 256, 5))
    lin.finalize(torch.float32, torch.device("cpu"))
    assert lin.method.name == "dense"


@pytest.mark.parametrize("source", ["canonical", "packed"])
def test_refiner_makes_the_top_candidates_exact(source):
    c = decode("Q8_0", _random_blocks("Q8_0", 300, 64, 9), (300, 64))
    w = c.dequantize()  # [V, D]
    if source == "canonical":
        rows = canonical_rows(c)
    else:  # rows read back from the packed head itself (what a tied embedding uses too)
        if not packed.available():
            pytest.skip("ember's kernels are not available here")
        layer = torch.nn.Module()
        packed.pack_chunks(layer, [c], *c.q.shape, c.bits, None)
        rows = partial(packed.rows_f32, layer)
        ids = torch.tensor([299, 0, 17, 17])
        assert torch.equal(rows(ids), w[ids])  # bit for bit: Q8_0's q * s + o is exact in fp32
    h = torch.randn(2, 64)
    exact = h @ w.T
    noisy = exact + torch.randn_like(exact) * 0.05  # what a bf16 pass returns, roughly
    out = TopRefiner(rows, k=16)(noisy, h)
    top = out.topk(16).indices
    assert torch.allclose(out.gather(1, top), exact.gather(1, top), atol=1e-4)
    assert torch.equal(out.argmax(-1), exact.argmax(-1))


def test_row_chunked_packing_equals_one_shot(monkeypatch, cpu_backend):
    """Big heads are packed in row chunks (bounded load memory); chunks that end off a 64-row block
    boundary, across shards, must give exactly the one-shot layer."""
    import ember.quant.int4 as int4

    shards = [_raw("Q4_1", 200, 256, 7), _raw("Q8_0", 136, 256, 8)]

    def build():
        lin = Linear(256, [200, 136], shards=("a", "b"))
        lin.load("a", shards[0])
        lin.load("b", shards[1])
        lin.finalize(torch.bfloat16, torch.device("cpu"))
        return lin

    whole = build()
    monkeypatch.setattr(int4, "CHUNK_ROWS", 96)  # not a multiple of 64: exercises the carried rows
    chunked = build()
    names = ("codes", "s16", "o16") if cpu_backend == "kernels" else ("qweight", "scales_zeros")
    for name in names:
        assert torch.equal(getattr(whole, name), getattr(chunked, name)), name
