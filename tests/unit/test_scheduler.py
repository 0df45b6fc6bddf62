"""Scheduler policy on its own (no model): token budget, chunked prefill beside decodes, arrival order,
preemption order, block accounting. A fake step stands in for the runner and the sampler."""

from __future__ import annotations

import torch

from ember import SamplingParams
from ember.config import EngineConfig, ModelConfig
from ember.engine.kv_cache import KVCache
from ember.engine.request import Request, Status
from ember.engine.scheduler import Scheduler, SchedulerOutput

BLOCK = 4
CFG = ModelConfig(architecture="llama", vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=1,
                  num_heads=1, num_kv_heads=1, head_dim=4, max_position_embeddings=4096)
PER_BLOCK = 2 * 4 * 4 * BLOCK  # k+v x head dim x fp32 bytes x tokens


def scheduler(blocks: int, budget: int, max_seqs: int = 8, prefix_caching: bool = True) -> Scheduler:
    cfg = EngineConfig(kv_cache_memory=blocks * PER_BLOCK, block_size=BLOCK, max_num_seqs=max_seqs,
                       max_num_batched_tokens=budget, prefix_caching=prefix_caching)
    return Scheduler(cfg, KVCache(CFG, cfg.kv_cache_memory, BLOCK, torch.float32, torch.device("cpu"),
                                  prefix_caching))


def request(prompt_len: int, max_tokens: int, first: int = 0) -> Request:
    return Request(list(range(first, first + prompt_len)), SamplingParams(max_tokens=max_tokens), max_tokens,
                   frozenset())


def step(s: Scheduler) -> SchedulerOutput:
    """Schedule, 'compute' (what the runner records), sample a token where due, finish at max_tokens."""
    out = s.schedule()
    assert out.num_tokens <= s.cfg.max_num_batched_tokens
    for seq in out.seqs:
        seq.request.num_computed_tokens = seq.start + seq.num_tokens
    s.commit(out)
    for seq in out.seqs:
        req = seq.request
        if seq.samples:
            req.output_token_ids.append(7)
            if req.num_output_tokens == req.max_tokens:
                s.finish(req, "length")
    return out


def test_a_long_prompt_is_chunked_and_never_stalls_running_streams():
    s = scheduler(blocks=64, budget=16)
    running = [request(3, 40, first=10 * i) for i in range(3)]
    for r in running:
        s.add(r)
    step(s)  # the three prompts fit one step together
    long = request(100, 1, first=500)
    s.add(long)
    chunks = []
    while long.status is not Status.FINISHED:
        out = step(s)
        by_req = {id(q.request): q.num_tokens for q in out.seqs}
        assert all(by_req[id(r)] == 1 for r in running)  # every stream decodes in every step
        chunks.append(by_req[id(long)])
    assert chunks == [13] * 7 + [9]  # budget 16 less three decode tokens, until the prompt is done
    assert long.num_output_tokens == 1


def test_requests_start_in_arrival_order():
    s = scheduler(blocks=64, budget=64, max_seqs=2)
    reqs = [request(4, 2 + i, first=10 * i) for i in range(5)]
    for r in reqs:
        s.add(r)
    started: list[Request] = []
    while s.has_unfinished():
        for seq in step(s).seqs:
            if seq.start == 0:
                started.append(seq.request)
        assert len(s.running) <= 2
    assert started == reqs


def test_preemption_takes_the_newest_and_restarts_it_first():
    # 6 blocks of 4 tokens: two requests of 8 prompt + 8 output tokens (4 blocks each) cannot both finish
    s = scheduler(blocks=6, budget=64, prefix_caching=False)
    start = s.kv.num_free_blocks
    a, b, c = request(8, 8, first=0), request(8, 8, first=100), request(4, 2, first=200)
    for r in (a, b):
        s.add(r)
    step(s)
    preempted, admitted = [], []
    while s.has_unfinished():
        if b.num_output_tokens == 2 and c.status is Status.WAITING and c not in s.waiting:
            s.add(c)  # arrives while b runs; c would fit beside a, but b (preempted later) goes first
        before = list(s.running)
        out = step(s)
        preempted += out.preempted
        admitted += [q.request for q in out.seqs if q.request not in before]
    assert preempted == [b]
    assert admitted == [b, c]
    assert [r.num_output_tokens for r in (a, b, c)] == [8, 8, 2]
    assert s.kv.num_free_blocks == start  # nothing leaks


def test_a_request_that_does_not_fit_waits_holding_nothing():
    s = scheduler(blocks=4, budget=64, prefix_caching=False)
    a, big = request(12, 4, first=0), request(12, 1, first=50)
    s.add(a)
    s.add(big)
    out = step(s)
    assert [q.request for q in out.seqs] == [a] and big.block_table == [] and s.waiting[0] is big
    while s.has_unfinished():
        step(s)
    assert big.num_output_tokens == 1 and s.kv.num_free_blocks == 4
