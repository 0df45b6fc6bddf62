"""What the server's endpoints need of an engine, whether it runs in this process or behind Ray Serve.

The handlers are written against `EngineClient`; `LocalEngine` is the in-process one (the async engine of
`ember serve`), `ember.server.ray_client.RayEngine` the one that reaches engine replicas through a Ray
Serve handle. One server codebase: the same request models, errors, SSE and metrics for both.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from ember.engine.async_engine import AsyncEngine
from ember.engine.engine import Engine
from ember.engine.outputs import RequestOutput
from ember.llm import LLM
from ember.sampling_params import SamplingParams

# A scored prompt token: (token id, logprob or None for the first token, [(id, logprob), ...] best first)
ScoredToken = tuple[int, float | None, list[tuple[int, float]]]


class EngineUnavailable(RuntimeError):
    """The engine that ran (or was to run) a request is gone: its replica died or none is up. A 503: the
    client may retry, and a new request goes to a live replica."""


class EngineBusy(RuntimeError):
    """The engine cannot take this now (e.g. every KV block is held by running requests): a 503, retry."""


@dataclass
class EngineStats:
    """One engine's figures for /metrics: gauges now, and counters since it started."""

    replica: str | None  # None for the one in-process engine
    running: int
    waiting: int
    kv_blocks_free: int
    kv_blocks_total: int
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    pid: int = 0

    def as_dict(self) -> dict[str, int | str | None]:
        return asdict(self)


class EngineClient(Protocol):
    async def add(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str) -> str:
        """Queue a request; a bad one (too long, bad grammar) raises here, before any output."""
        ...

    def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """An added request's outputs; leaving early aborts it. Ends with finish_reason "abort" after
        abort(); raises EngineUnavailable when its engine dies."""
        ...

    def abort(self, request_id: str) -> None: ...

    def discard(self, request_id: str) -> None:
        """Abort a request whose stream will never be read."""
        ...

    async def score(self, prompt_token_ids: list[int], top_n: int) -> list[ScoredToken]:
        """Logprob of every prompt token given the ones before it, with the top_n alternatives."""
        ...

    def stats(self) -> list[EngineStats]: ...

    def close(self) -> None: ...


def score_prompt(llm: LLM, ids: list[int], n: int) -> list[ScoredToken]:
    """Run in the engine's loop thread (it uses the engine's cache)."""
    try:
        logp = torch.log_softmax(llm.logits(ids), dim=-1)  # [S, V]; checks the length against the cache
    except RuntimeError as e:  # every block is taken by running requests right now
        raise EngineBusy(f"cannot score the prompt now ({e}); retry") from None
    out: list[ScoredToken] = [(ids[0], None, [])]
    for j in range(1, len(ids)):
        top = logp[j - 1].topk(n) if n else None
        pairs = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        out.append((ids[j], logp[j - 1, ids[j]].item(), pairs))
    return out


class LocalEngine:
    """The engine in this process: `AsyncEngine` plus scoring and figures."""

    def __init__(self, llm: LLM | Callable[[], LLM], replica: str | None = None) -> None:
        """llm: a loaded model, or (faster: see AsyncEngine) a function that loads it on the engine's thread."""
        self.replica = replica
        if isinstance(llm, LLM):
            self.llm = llm
            self.aeng = AsyncEngine(llm.engine)
        else:
            def build() -> Engine:
                self.llm = llm()
                return self.llm.engine

            self.aeng = AsyncEngine(build)
        self.add, self.stream = self.aeng.add, self.aeng.stream
        self.abort, self.discard = self.aeng.abort, self.aeng.discard
        # counted by the engine's owner (the replica), as requests finish
        self.requests = self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0

    async def score(self, prompt_token_ids: list[int], top_n: int) -> list[ScoredToken]:
        return await self.aeng.call(lambda: score_prompt(self.llm, prompt_token_ids, top_n))

    def count(self, out: RequestOutput) -> None:
        """A finished request's tokens, for this engine's counters."""
        self.requests += 1
        self.prompt_tokens += out.usage.prompt_tokens
        self.completion_tokens += out.usage.completion_tokens
        self.cached_tokens += out.usage.cached_tokens

    def stats(self) -> list[EngineStats]:
        kv = self.llm.engine.kv
        return [EngineStats(self.replica, self.aeng.num_running, self.aeng.num_waiting, kv.num_free_blocks,
                            kv.num_blocks, self.requests, self.prompt_tokens, self.completion_tokens,
                            self.cached_tokens, os.getpid())]

    def check_health(self, stuck_after_s: float) -> None:
        self.aeng.check_health(stuck_after_s)

    def close(self) -> None:
        self.aeng.close()
