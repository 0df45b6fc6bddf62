"""Request: the minimal state of one generation; lengths are derived, never stored twice."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ember.sampling_params import SamplingParams

if TYPE_CHECKING:
    from ember.structured.backend import Constraint

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity: queues look requests up with `in` and remove(), which must not compare fields
class Request:
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens, or what fits the context when that is None
    eos_token_ids: frozenset[int]
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed_tokens: int = 0  # tokens whose k/v are in the cache
    num_cached_tokens: int = 0  # prompt tokens whose k/v came from the prefix cache (not computed)
    block_table: list[int] = field(default_factory=list)
    block_keys: list = field(default_factory=list)  # chain keys of the full blocks registered so far
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    # Structured output: follows the sampled tokens (kept through preemption: the outputs are kept too)
    constraint: Constraint | None = None

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
