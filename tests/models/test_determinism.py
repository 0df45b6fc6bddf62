"""The same greedy request gives the same numbers every time on ember's kernels: fresh, after its prefix was
cached (any number of blocks), prefilled in chunks of any size, alone or in a batch of 16, and run twice in
one engine. Every query row goes through one attention kernel whose arithmetic does not depend on how the
prompt was cut, so nothing that ran before or beside a request can flip a near-tie. Compared bit for bit at
every step's 16 best logits, the ones the head computes exactly and greedy picks from (a token flip needs a
near-tie; a changed bit shows at once). The rest of a row's logits come from the head's fast pass, whose
last bits may move with the number of rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ember
from ember import SamplingParams
from ember.quant import packed

TEXT = (Path(__file__).resolve().parents[1] / "data" / "prose.txt").read_text()
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
MIB = 1 << 20


def load(path: Path, bits: int, **kw) -> ember.LLM:
    return ember.load(path, kv_cache_memory=64 * MIB, act_bits=bits, **kw)


@pytest.fixture(scope="module", params=[16, 8], ids=["exact", "int8"])
def bits(request) -> int:
    """Both activation modes: the exact one (the default below ~1B weights) and int8 (from ~1B)."""
    return request.param


def run(llm: ember.LLM, prompts: list[list[int]]) -> list[tuple[list[int], torch.Tensor]]:
    """Greedy tokens and the 16 best logits [steps, 16] of each step, all prompts in one batch."""
    rows: dict[str, list[torch.Tensor]] = {}
    real = llm.engine.runner.run

    def recording(batch, *rest):
        logits = real(batch, *rest)
        sampled = [s.request.request_id for s in batch.seqs if s.samples]
        for rid, row in zip(sampled, logits if logits is not None else [], strict=True):
            rows.setdefault(rid, []).append(row.topk(16).values)
        return logits

    llm.engine.runner.run = recording
    try:
        outs = llm.generate(prompts, GREEDY)
    finally:
        llm.engine.runner.run = real
    return [(o.token_ids, torch.stack(rows[o.request_id])) for o in outs]


def same(got: list[tuple[list[int], torch.Tensor]], want: list[tuple[list[int], torch.Tensor]]) -> bool:
    return all(g[0] == w[0] and torch.equal(g[1], w[1]) for g, w in zip(got, want, strict=True))


@pytest.fixture(scope="module")
def prompts(smollm_gguf) -> list[list[int]]:
    if not packed.available():
        pytest.skip("ember's kernels are not available on this machine")
    llm = load(smollm_gguf, 16)
    ids = llm.encode(TEXT)
    # lengths around block (16) and chunk (256) edges, and a chat-formatted one
    cuts = [(0, 5), (40, 71), (10, 150), (7, 300), (200, 533)]
    chat = llm.encode_chat([{"role": "user", "content": TEXT[:400]}])
    return [ids[a:b] for a, b in cuts] + [chat]


@pytest.fixture(scope="module")
def fresh(smollm_gguf, prompts, bits) -> list[tuple[list[int], torch.Tensor]]:
    """Each prompt alone in a new engine with no prefix cache: the reference."""
    llm = load(smollm_gguf, bits, prefix_caching=False)
    return [run(llm, [p])[0] for p in prompts]


def test_twice_in_one_engine_and_after_cached_prefixes(smollm_gguf, bits, prompts, fresh):
    llm = load(smollm_gguf, bits)
    for _ in range(2):  # the second round reuses every prompt's cached blocks
        assert same([run(llm, [p])[0] for p in prompts], fresh)
    for p, want in zip(prompts, fresh, strict=True):
        for blocks in range(1, len(p) // 16 + 1, 4):  # a cached prefix of `blocks` blocks, then the rest
            llm.engine.kv.pool.reset_prefix_cache()
            llm.generate([p[: 16 * blocks] + [p[0]] * 3], SamplingParams(temperature=0, max_tokens=1))
            assert same(run(llm, [p]), [want]), (len(p), blocks)


@pytest.mark.parametrize("step_tokens", [7, 37, 129])
def test_chunked_prefill_of_any_size(smollm_gguf, bits, prompts, fresh, step_tokens):
    llm = load(smollm_gguf, bits, prefix_caching=False, max_num_seqs=4, max_num_batched_tokens=step_tokens)
    assert same([run(llm, [p])[0] for p in prompts], fresh)


def test_in_a_batch_of_16(smollm_gguf, bits, prompts, fresh):
    llm = load(smollm_gguf, bits)
    assert same(run(llm, (prompts * 3)[:16]), (fresh * 3)[:16])
