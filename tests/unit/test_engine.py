"""Engine behaviour on a tiny random model: terminators, min_tokens, preemption, abort, block accounting."""

from __future__ import annotations

import pytest
import torch

import ember
from ember import SamplingParams
from ember.errors import ContextLengthError, ParameterError

PROMPTS = [[5, 17, 200, 33], [90, 12, 255, 1, 64, 100, 7], [3, 3, 3], list(range(40, 70))]


@pytest.fixture(scope="module")
def llm(tiny_path):
    return ember.load(tiny_path, dtype="float32")


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


def test_stop_token_ids_finish_with_stop(llm):
    free = llm.generate([PROMPTS[0]], greedy(12))[0]
    target = free.token_ids[5]
    out = llm.generate([PROMPTS[0]], greedy(12, stop_token_ids=[target]))[0]
    cut = free.token_ids.index(target)
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: cut + 1]


def test_eos_stops_unless_ignored_and_min_tokens_holds(llm):
    free = llm.generate([PROMPTS[1]], greedy(10))[0]
    eos = free.token_ids[3]  # pretend this token is the model's end-of-sequence token
    tok = llm.tokenizer
    saved = tok.eos_token_ids
    tok.eos_token_ids = frozenset({eos})
    try:
        stopped = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=10))[0]
        assert stopped.finish_reason == "stop" and len(stopped.token_ids) == free.token_ids.index(eos) + 1
        held = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=10, min_tokens=8))[0]
        assert eos not in held.token_ids[:8] and len(held.token_ids) >= 8
        ignored = llm.generate([PROMPTS[1]], greedy(10))[0]
        assert ignored.token_ids == free.token_ids and ignored.finish_reason == "length"
    finally:
        tok.eos_token_ids = saved


def test_preemption_with_a_small_cache_keeps_outputs(tiny_path, llm):
    alone = [llm.generate([p], greedy(40))[0].token_ids for p in PROMPTS]
    # 6 blocks of 16 tokens: not enough for all four requests at once, so some get preempted
    per_block = 2 * 2 * 2 * 16 * 4 * 16  # k+v * layers * kv heads * head dim * fp32 * block
    small = ember.load(tiny_path, dtype="float32", kv_cache_memory=6 * per_block)
    assert small.engine.kv.num_blocks == 6
    start = small.engine.kv.num_free_blocks
    outs = small.generate(PROMPTS, greedy(40))
    assert [o.token_ids for o in outs] == alone
    assert small.engine.kv.num_free_blocks == start


def test_abort_frees_blocks(llm):
    eng = llm.engine
    start = eng.kv.num_free_blocks
    rid = eng.add_request(PROMPTS[3], greedy(50))
    for _ in range(3):
        eng.step()
    assert eng.kv.num_free_blocks < start
    final = eng.abort(rid)
    assert final.finished and final.finish_reason == "abort"
    assert eng.kv.num_free_blocks == start and not eng.has_unfinished()


def test_seeded_rows_ignore_their_neighbours(llm):
    p = SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], p)[0].token_ids
    mixed = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], p)[0].token_ids
    assert alone == mixed


def test_bad_requests(llm):
    with pytest.raises(ParameterError, match="empty"):
        llm.generate([[]], greedy(4))
    with pytest.raises(ParameterError, match="vocabulary"):
        llm.generate([[1, 99999]], greedy(4))
    with pytest.raises(ContextLengthError, match="context"):
        llm.generate([list(range(300))], greedy(4))
    with pytest.raises(ParameterError, match="vocabulary"):
        llm.generate([[1, 2, 3], [1, 99999]], greedy(4))  # the good first prompt must not be left running
    assert not llm.engine.has_unfinished()


def test_prefix_reuse_computes_only_new_tokens(tiny_path, llm):
    """A second request sharing a 200-token prefix computes only its own tokens, with the same output."""
    prefix = [(7 * i + 3) % 250 + 1 for i in range(200)]
    first, second = prefix + [11, 12, 13], prefix + [21, 22, 23, 24]
    eng = llm.engine
    eng.kv.pool.reset_prefix_cache()
    start_free = eng.kv.num_free_blocks
    llm.generate([first], greedy(6))
    before = eng.num_tokens_computed
    out = llm.generate([second], greedy(6))[0]
    reused = 200 // 16 * 16  # the full blocks of the shared prefix
    assert out.usage.cached_tokens == reused
    assert eng.num_tokens_computed - before == len(second) - reused + 5  # its own prompt tokens, then 5 decodes
    fresh = ember.load(tiny_path, dtype="float32", prefix_caching=False)
    alone = fresh.generate([second], greedy(6))[0]
    assert alone.usage.cached_tokens == 0 and out.token_ids == alone.token_ids
    assert eng.kv.num_free_blocks == start_free  # cached blocks count as free: nothing leaked


def test_whole_prompt_cached_still_computes_its_last_token(llm):
    p = list(range(1, 33))  # exactly two blocks
    a = llm.generate([p], greedy(4))[0]
    b = llm.generate([p], greedy(4))[0]
    assert a.token_ids == b.token_ids and b.usage.cached_tokens == 16  # the last block is recomputed


def test_block_pool_evicts_least_recent_and_keeps_counts():
    from ember.engine.block_pool import BlockPool, block_keys

    pool = BlockPool(4, 2)
    a = pool.allocate(2)
    keys = block_keys([1, 2, 3, 4], 2)
    for b, k in zip(a, keys, strict=True):
        pool.register(b, k)
    shared = pool.match(keys)
    assert shared == a and pool.ref[a[0]] == 2
    pool.free(shared)
    pool.free(list(a))  # free() empties the list it is given, as a request's block table
    assert pool.num_free == 4 and len(pool.cached) == 2
    pool.allocate(3)  # two plain blocks first, then the least recently freed cached one (the tail, a[1])
    assert pool.match(keys) == [a[0]] and keys[1] not in pool.cached


def test_a_default_max_tokens_shrinks_to_the_room_left(llm):
    """No params given: the default max_tokens (256 here) fits the context instead of failing."""
    out = llm.generate([list(range(1, 251))])[0]  # context 256
    assert len(out.token_ids) <= 6 and out.finish_reason in ("stop", "length")
    with pytest.raises(ContextLengthError):  # asked for explicitly: the user hears about it
        llm.generate([list(range(1, 251))], SamplingParams(max_tokens=10))


def test_engine_limits_are_honoured_and_checked(tiny_path, monkeypatch):
    """max_num_seqs / max_num_batched_tokens reach the scheduler; impossible pairs fail before loading."""
    with pytest.raises(ParameterError, match="max_num_batched_tokens=8 is below max_num_seqs=64"):
        ember.load(tiny_path / "not-even-read", max_num_batched_tokens=8)
    with pytest.raises(ParameterError, match="max_num_seqs=0"):
        ember.load(tiny_path, max_num_seqs=0)
    assert ember.load(tiny_path).engine.config.max_num_batched_tokens == 256  # the CPU default
    assert ember.load(tiny_path, max_num_seqs=300).engine.config.max_num_batched_tokens == 300  # grows to fit
    small = ember.load(tiny_path, dtype="float32", max_num_seqs=2, max_num_batched_tokens=8)
    seen = []
    schedule = small.engine.scheduler.schedule

    def spy():
        out = schedule()
        seen.append((out.num_tokens, len(small.engine.scheduler.running)))
        return out

    monkeypatch.setattr(small.engine.scheduler, "schedule", spy)
    outs = small.generate(PROMPTS, greedy(5))
    assert all(len(o.token_ids) == 5 for o in outs)
    assert max(n for n, _ in seen) == 8 and max(r for _, r in seen) == 2  # the 30-token prompt went in chunks


def test_gpu_kv_cache_takes_free_memory_up_to_what_requests_can_use(monkeypatch):
    """On a GPU the cache is 60 % of the memory the weights left, capped at every running request at full context
    (a tiny model would otherwise take tens of GB); never below 256 MiB."""
    from ember.config import EngineConfig, ModelConfig, gpu_kv_bytes

    cfg = ModelConfig(architecture="llama", vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=4096)
    per_token = 2 * 2 * 2 * 16 * 2  # k and v, layers, kv heads, head dim, bf16 bytes
    eng = EngineConfig(max_num_seqs=512, max_num_batched_tokens=512, kv_cache_memory=1)
    free = {"bytes": 100 << 30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 141 << 30))
    dev = torch.device("cuda")
    assert gpu_kv_bytes(dev, cfg, torch.bfloat16, eng) == per_token * (512 * 4096 + 16)  # ~537 MB, not 60 GB
    eng.max_model_len = 1 << 20  # longer than the model's context: the model's bounds it
    assert gpu_kv_bytes(dev, cfg, torch.bfloat16, eng) == per_token * (512 * 4096 + 16)
    eng.max_model_len = 64
    assert gpu_kv_bytes(dev, cfg, torch.bfloat16, eng) == 256 << 20  # the floor
    big = ModelConfig(architecture="llama", vocab_size=320, hidden_size=4096, intermediate_size=128, num_layers=32,
                      num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=131072)
    free["bytes"], eng.max_model_len = 10 << 30, None
    assert gpu_kv_bytes(dev, big, torch.bfloat16, eng) == int((10 << 30) * 0.6)  # free memory binds
