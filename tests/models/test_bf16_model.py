"""A half-precision checkpoint on ember's bf16 kernel: every linear (the tied head too) on bf16 tiles, the
one-call decode step taken and equal to the per-op path bit for bit, and a greedy request's numbers the same
fresh, after cached prefixes, in chunks and in a batch of 16 (torch's bf16 linear, which this replaces,
rounds differently per row count)."""

from __future__ import annotations

import pytest
import torch

import ember
from ember.layers.linear import Linear
from ember.quant import bf16tile

from .test_determinism import run, same
from .tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.skipif(not bf16tile.available(), reason="needs AVX512-BF16 and a C compiler")
MIB = 1 << 20


@pytest.fixture(scope="module")
def f16_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("f16") / "tiny-f16.gguf", dense_kind="F16", seed=3)


def load(path, **kw) -> ember.LLM:
    return ember.load(path, kv_cache_memory=16 * MIB, **kw)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 31, 70, 150, 201)]


@pytest.fixture(scope="module")
def fresh(f16_gguf, prompts):
    llm = load(f16_gguf, prefix_caching=False)
    return [run(llm, [p])[0] for p in prompts]


def test_every_linear_is_on_bf16_tiles(f16_gguf):
    llm = load(f16_gguf)
    model = llm.engine.runner.model
    assert llm.dtype == torch.bfloat16
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(isinstance(m.method, bf16tile.Bf16TileMethod) for m in linears)
    assert model.embed_tokens.rows is not None  # the tied embedding reads the head's tiles: one table
    assert model.decode_step is not None


def test_logits_close_to_the_fp32_run(f16_gguf):
    ids = [5, 17, 200, 33, 90, 12]
    got, want = load(f16_gguf).logits(ids).float(), load(f16_gguf, dtype="float32").logits(ids)
    assert (got - want).abs().max().item() < 0.02 * want.abs().max().item()


def test_fused_decode_step_equals_the_per_op_path(f16_gguf, prompts, fresh, monkeypatch):
    monkeypatch.setenv("EMBER_FUSED", "0")
    llm = load(f16_gguf, prefix_caching=False)
    assert llm.engine.runner.model.decode_step is None
    assert same([run(llm, [p])[0] for p in prompts], fresh)


def test_same_after_cached_prefixes(f16_gguf, prompts, fresh):
    llm = load(f16_gguf)
    for _ in range(2):
        assert same([run(llm, [p])[0] for p in prompts], fresh)
    for p, want in zip(prompts, fresh, strict=True):
        for blocks in range(1, len(p) // 16 + 1, 3):
            llm.engine.kv.pool.reset_prefix_cache()
            llm.generate([p[: 16 * blocks] + [p[0]] * 3], ember.SamplingParams(temperature=0, max_tokens=1))
            assert same(run(llm, [p]), [want]), (len(p), blocks)


@pytest.mark.parametrize("step_tokens", [7, 37])
def test_same_in_chunks_of_any_size(f16_gguf, prompts, fresh, step_tokens):
    llm = load(f16_gguf, prefix_caching=False, max_num_seqs=4, max_num_batched_tokens=step_tokens)
    assert same([run(llm, [p])[0] for p in prompts], fresh)


def test_same_in_a_batch_of_16(f16_gguf, prompts, fresh):
    assert same(run(load(f16_gguf), (prompts * 4)[:16]), (fresh * 4)[:16])
