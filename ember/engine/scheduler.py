"""Scheduler: waiting and running queues, a token budget per step, chunked prefill, preemption.

Running requests go first (each decode needs one token), so a long prompt is cut into chunks and
never stalls the streams already running. A request starting (or restarting) takes the longest cached
prefix of its tokens from the block pool and computes only the rest. When blocks run out, the newest
running request is preempted: its blocks are freed and it is recomputed later (first in line, so it
cannot starve; its blocks usually still hold its prefix then).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ember.config import EngineConfig
from ember.engine.block_pool import block_keys
from ember.engine.kv_cache import KVCache
from ember.engine.request import Request, Status


@dataclass
class ScheduledSeq:
    request: Request
    start: int  # first position computed this step (= num_computed_tokens before the step)
    num_tokens: int  # positions computed this step

    @property
    def samples(self) -> bool:
        """The chunk reaches the last known token, so this step yields the request's next token."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)


class Scheduler:
    def __init__(self, cfg: EngineConfig, kv: KVCache) -> None:
        self.cfg, self.kv = cfg, kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _grow(self, req: Request, upto: int) -> bool:
        """Make sure req owns blocks for positions < upto; False when the pool is short."""
        need = self.kv.blocks_needed(upto) - len(req.block_table)
        if need <= 0:
            return True
        if need > self.kv.num_free_blocks:
            return False
        req.block_table.extend(self.kv.allocate(need))
        return True

    def _reuse_prefix(self, req: Request) -> None:
        """Start req on the cached blocks of its longest cached prefix; at least one token stays to compute."""
        bs = self.kv.block_size
        keys = block_keys(req.all_token_ids[: req.num_tokens - 1], bs)
        req.block_table = self.kv.pool.match(keys)
        req.block_keys = keys[: len(req.block_table)]
        req.num_computed_tokens = len(req.block_table) * bs
        if req.num_output_tokens == 0:
            req.num_cached_tokens = req.num_computed_tokens

    def _release(self, req: Request) -> None:
        self.kv.free(req.block_table)
        req.block_keys.clear()
        req.num_computed_tokens = 0

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self._release(req)
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        out.preempted.append(req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.cfg.max_num_batched_tokens
        for req in list(self.running):
            if budget == 0:
                break
            if req not in self.running:  # preempted while making room for an earlier request
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self._grow(req, req.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    break
            if req.status is Status.RUNNING:
                out.seqs.append(ScheduledSeq(req, req.num_computed_tokens, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            req = self.waiting[0]
            if not req.block_table:
                self._reuse_prefix(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._grow(req, req.num_computed_tokens + n):
                self._release(req)  # the cached prefix goes back too: it waits with nothing held
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            out.seqs.append(ScheduledSeq(req, req.num_computed_tokens, n))
            budget -= n
        return out

    def commit(self, batch: SchedulerOutput) -> None:
        """After a step: blocks that became full of computed k/v join the prefix cache."""
        bs = self.kv.block_size
        for s in batch.seqs:
            req = s.request
            done = len(req.block_keys)
            if req.num_computed_tokens // bs > done:
                parent = hash(req.block_keys[-1]) if done else 0
                new = block_keys(req.all_token_ids[: req.num_computed_tokens], bs, done, parent)
                for i, key in enumerate(new, start=done):
                    self.kv.pool.register(req.block_table[i], key)
                req.block_keys.extend(new)

    def finish(self, req: Request, reason: str | None) -> None:
        """Take req out of the queues (finished or aborted) and return its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._release(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
