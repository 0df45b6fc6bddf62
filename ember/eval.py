"""Quality checks on a loaded model: perplexity over a text, and bitsandbytes' pi-digits sampling check.

Both read the model only through the public API (`llm.logits`, `llm.generate`), so they measure what
a user runs, quantized or not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ember.errors import ParameterError
from ember.sampling_params import SamplingParams

# `llm.logits` returns [window, V] fp32: 200 MB for SmolLM2's 49k vocabulary at 1024 tokens (1 GB for
# Gemma 3's 262k), so the default window is the model's context only up to this many tokens.
DEFAULT_WINDOW = 1024
PI = str(math.pi)  # "3.141592653589793"
PI_PROMPT = "3.14159"


def context_limit(llm: Any) -> int:
    """Most tokens one `llm.logits` call can score: the context, or less when the KV cache is smaller."""
    return min(llm.engine.max_model_len, llm.engine.kv.capacity_tokens)


def perplexity(llm: Any, text: str | Sequence[int], *, window: int | None = None,
               stride: int | None = None) -> tuple[float, int]:
    """(perplexity, tokens scored) of `text` under the model: exp of the mean next-token NLL.

    Every token but the first is scored exactly once. A text longer than `window` is read in windows
    that advance by `stride`: each window scores only its last `stride` tokens (its first ones are
    context already scored by an earlier window), so every scored token sees at least
    window - stride tokens before it. Defaults: window = min(context, 1024), stride = window // 2.
    """
    ids = llm.encode(text)
    n = len(ids)
    if n < 2:
        raise ParameterError(f"the text has {n} token(s): perplexity needs at least 2 (one to predict from)")
    limit = context_limit(llm)
    window = min(limit, DEFAULT_WINDOW) if window is None else window
    if not isinstance(window, int) or not 2 <= window <= limit:
        raise ParameterError(f"window={window!r} is invalid: give 2..{limit} tokens (the model's context)")
    stride = max(1, window // 2) if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride < window:
        raise ParameterError(f"stride={stride!r} is invalid: give 1..{window - 1} (less than the window, so "
                             "each window keeps some context)")
    nll = 0.0
    scored = 1  # ids[:scored] are done; ids[0] has nothing before it to be predicted from
    end = min(window, n)
    while True:
        begin = max(0, end - window)
        logits = llm.logits(ids[begin:end])  # [end - begin, V]; row j predicts ids[begin + j + 1]
        rows = logits[scored - 1 - begin : end - 1 - begin]  # [end - scored, V]: the rows for ids[scored:end]
        target = torch.tensor(ids[scored:end], device=rows.device)[:, None]  # [end - scored, 1]
        logp = rows.gather(1, target)[:, 0] - torch.logsumexp(rows, dim=-1)  # log p(target), fp32
        nll -= float(logp.double().sum())
        scored = end
        if end == n:
            return math.exp(nll / (n - 1)), n - 1
        end = min(end + stride, n)


@dataclass
class PiResult:
    texts: list[str]  # prompt + continuation, as bitsandbytes compares them

    @property
    def hits(self) -> int:
        return sum(t.startswith(PI) for t in self.texts)

    def __str__(self) -> str:
        return f"{self.hits}/{len(self.texts)} start with {PI}"


def pi_check(llm: Any, n: int = 6, seed: int = 0) -> PiResult:
    """bitsandbytes' generation check (tests/test_generation.py, test_pi): sample n continuations of
    "3.14159" (temperature 0.7, top-p 0.9, 20 new tokens) and count the decoded texts, prompt
    included, that start with str(math.pi). A broken quantization rarely gets the digits right.

    top_k=50 is transformers' default, so it is in force in their test too. Request i uses seed + i:
    reproducible, and one batch.
    """
    if not isinstance(n, int) or n < 1:
        raise ParameterError(f"n={n!r} is invalid: give a positive number of samples")
    params = [SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_tokens=20, seed=seed + i)
              for i in range(n)]
    outs = llm.generate([PI_PROMPT] * n, params)
    return PiResult([PI_PROMPT + o.text for o in outs])
