"""SamplingParams: how one request picks its tokens and when it stops.

A validated dataclass: a bad value fails at construction with a message that names the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from ember.errors import ParameterError
from ember.structured.spec import StructuredOutputs, as_structured

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 bans a token, +100 all but forces it


def _fail(name: str, value: object, must: str) -> None:
    raise ParameterError(f"SamplingParams.{name}={value!r} is invalid: {name} must be {must}")


@dataclass
class SamplingParams:
    """Sampling and stopping parameters of one request.

    temperature 0 means greedy. top_k 0 (or -1) disables top-k; top_p 1.0 and min_p 0.0 disable
    theirs. Penalties follow the OpenAI / HF conventions: repetition_penalty multiplies (1.0 = off)
    and looks at prompt + output; presence/frequency penalties subtract and look at the output only.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 256
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    structured: StructuredOutputs | Any = None
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._check_numbers()
        for s in self.stop:
            if not isinstance(s, str) or not s:
                _fail("stop", self.stop, "a list of non-empty strings")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                _fail("stop_token_ids", self.stop_token_ids, "a list of non-negative token ids")
        self.structured = as_structured(self.structured)
        if self.structured is not None:
            for name, off in (("ignore_eos", False), ("min_tokens", 0)):
                if getattr(self, name) != off:
                    _fail(name, getattr(self, name), f"{off} with structured (the grammar decides where the "
                                                       "output ends)")
        self._check_logit_bias()

    def _check_numbers(self) -> None:
        def num(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                _fail(name, v, "a finite number")
            return float(v)

        def integer(name: str, allow_none: bool = False) -> int | None:
            v = getattr(self, name)
            if v is None and allow_none:
                return None
            if isinstance(v, bool) or not isinstance(v, int):
                _fail(name, v, "an integer" + (" or None" if allow_none else ""))
            return v

        if num("temperature") < 0:
            _fail("temperature", self.temperature, ">= 0 (0 means greedy)")
        top_k = integer("top_k")
        if top_k is not None and top_k < -1:
            _fail("top_k", top_k, ">= 0 (0 or -1 disables it)")
        if not 0.0 < num("top_p") <= 1.0:
            _fail("top_p", self.top_p, "in (0, 1]")
        if not 0.0 <= num("min_p") <= 1.0:
            _fail("min_p", self.min_p, "in [0, 1]")
        if num("repetition_penalty") <= 0:
            _fail("repetition_penalty", self.repetition_penalty, "> 0 (1.0 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= num(name) <= 2.0:
                _fail(name, getattr(self, name), "in [-2, 2]")
        seed = integer("seed", allow_none=True)
        if seed is not None and not 0 <= seed < 2**63:
            _fail("seed", seed, "a non-negative integer below 2**63")
        max_tokens = integer("max_tokens", allow_none=True)
        if max_tokens is not None and max_tokens < 1:
            _fail("max_tokens", max_tokens, ">= 1 (or None for 'until the context is full')")
        min_tokens = integer("min_tokens")
        if min_tokens is not None and min_tokens < 0:
            _fail("min_tokens", min_tokens, ">= 0")
        if max_tokens is not None and min_tokens is not None and min_tokens > max_tokens:
            _fail("min_tokens", min_tokens, f"<= max_tokens ({max_tokens})")
        logprobs = integer("logprobs", allow_none=True)
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            _fail("logprobs", logprobs, f"between 0 and {MAX_LOGPROBS} (top-N alternatives per token)")
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True or False")

    def _check_logit_bias(self) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, dict):
            _fail("logit_bias", bias, "a dict of token id -> bias")
        clean: dict[int, float] = {}
        for k, v in bias.items():
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                _fail("logit_bias", bias, f"keyed by non-negative token ids (got key {k!r})")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS:
                _fail("logit_bias", bias, f"biases in [-100, 100] (token {k} has {v!r})")
            clean[k] = float(v)
        self.logit_bias = clean or None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> SamplingParams:
        """Build from keyword arguments, naming any unknown one instead of ignoring it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ParameterError(
                f"unknown sampling parameter(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**kwargs)  # type: ignore[arg-type]
