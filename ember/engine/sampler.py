"""Batched token sampler: prepare(states) once per step, then sample(logits).

Order follows HF / vLLM: raw logprobs -> logit_bias -> structured-output mask (constrained rows only) ->
repetition penalty -> presence/frequency penalties -> min_tokens suppression -> greedy argmax, or
temperature -> top-k -> top-p -> min-p -> draw. The mask comes before every knob, so a constrained row
samples from exactly the masked distribution.
Reported logprobs are the model's own distribution (log_softmax of the raw logits, fp32), taken
before any penalty, temperature or filter, as in vLLM's default "raw_logprobs" mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.kernels import ops
from ember.sampling_params import SamplingParams


@dataclass
class SamplingState:
    """The sampler's view of one running request (the engine builds one per row each step)."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # Seeded per request (torch.Generator().manual_seed(seed)) so a seed repeats whatever the batch.
    generator: torch.Generator | None = None
    # Terminators suppressed while len(output) < min_tokens, together with params.stop_token_ids.
    eos_token_ids: frozenset[int] = frozenset()


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # N = params.logprobs best (token_id, logprob), best first


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


@dataclass
class SamplingBatch:
    """Per-row parameters as tensors; None means no row of the batch uses that step."""

    generators: list[torch.Generator | None]
    logprobs_n: list[int | None]
    greedy_rows: list[bool]
    greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    temperature: torch.Tensor  # [B, 1] fp32, 1.0 on greedy rows so dividing is always safe
    filters: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # top_k [B], top_p [B], min_p [B]
    needs_sort: bool  # top-k or top-p in use (min-p alone needs no sort)
    rep_penalty: torch.Tensor | None  # [B, 1]
    seen: torch.Tensor | None  # [B, V] bool: token occurs in prompt + output
    presence: torch.Tensor | None  # [B, 1]
    frequency: torch.Tensor | None  # [B, 1]
    counts: torch.Tensor | None  # [B, V] fp32: occurrences in the output
    suppress: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) set to -inf
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # logit_bias: (rows, ids, values)
    allowed: tuple[torch.Tensor, torch.Tensor] | None = None  # constrained rows [R], their bitmasks [R, W]

    @property
    def plain_greedy(self) -> bool:
        """All rows greedy with nothing changing the logits: argmax of the raw logits is the answer."""
        return (
            self.all_greedy and self.rep_penalty is None and self.presence is None and self.suppress is None
            and self.bias is None and self.allowed is None
        )

    @property
    def max_logprobs(self) -> int:
        """Largest top-N asked for in the batch; -1 when no row wants logprobs."""
        return max((n for n in self.logprobs_n if n is not None), default=-1)


def _flat_index(
    rows: list[int], ids: list[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index pairs for index_put_: one tensor op for the batch instead of one per row."""
    r = torch.tensor([row for row, toks in zip(rows, ids, strict=True) for _ in toks], dtype=torch.long)
    c = torch.tensor([t for toks in ids for t in toks], dtype=torch.long)
    return r.to(device), c.to(device)


def prepare(
    states: list[SamplingState], vocab_size: int, device: torch.device | str = "cpu",
    allowed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SamplingBatch:
    """Turn the requests' parameters into batch tensors (host work only; no device sync).
    allowed: the structured-output rows [R] and the bitmask of tokens each may take [R, W] (RowMasks.get())."""
    device = torch.device(device)
    ps = [s.params for s in states]
    B, V = len(states), vocab_size

    def col(values: list[float]) -> torch.Tensor:  # [B, 1]
        return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)

    greedy = [p.greedy for p in ps]
    sampled = [p for p in ps if not p.greedy]
    filters, needs_sort = None, False
    if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in sampled):
        needs_sort = any(p.top_k > 0 or p.top_p < 1.0 for p in sampled)
        filters = (
            torch.tensor([max(p.top_k, 0) for p in ps], dtype=torch.long, device=device),
            torch.tensor([p.top_p for p in ps], dtype=torch.float32, device=device),
            torch.tensor([p.min_p for p in ps], dtype=torch.float32, device=device),
        )

    rep_penalty = seen = None
    rep_rows = [i for i, p in enumerate(ps) if p.repetition_penalty != 1.0]
    if rep_rows:
        rep_penalty = col([p.repetition_penalty for p in ps])
        seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        toks = [states[i].prompt_token_ids + states[i].output_token_ids for i in rep_rows]
        seen[_flat_index(rep_rows, toks, device)] = True

    presence = frequency = counts = None
    pf_rows = [i for i, p in enumerate(ps) if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0]
    if pf_rows:
        presence = col([p.presence_penalty for p in ps])
        frequency = col([p.frequency_penalty for p in ps])
        counts = torch.zeros(B, V, dtype=torch.float32, device=device)
        rows, cols = _flat_index(pf_rows, [states[i].output_token_ids for i in pf_rows], device)
        counts.index_put_((rows, cols), torch.ones(len(rows), device=device), accumulate=True)

    bias = None
    bias_rows = [i for i, p in enumerate(ps) if p.logit_bias]
    if bias_rows:
        items = [[(t, v) for t, v in ps[i].logit_bias.items() if t < V] for i in bias_rows]  # type: ignore[union-attr]
        rows, cols = _flat_index(bias_rows, [[t for t, _ in it] for it in items], device)
        bias = (rows, cols, torch.tensor([v for it in items for _, v in it], dtype=torch.float32, device=device))

    suppress = None
    sup_rows, sup_ids = [], []
    for i, s in enumerate(states):
        if len(s.output_token_ids) < s.params.min_tokens:
            ids = sorted(t for t in s.eos_token_ids | set(s.params.stop_token_ids) if t < V)
            if ids:
                sup_rows.append(i)
                sup_ids.append(ids)
    if sup_rows:
        suppress = _flat_index(sup_rows, sup_ids, device)

    return SamplingBatch(
        generators=[s.generator for s in states],
        logprobs_n=[p.logprobs for p in ps],
        greedy_rows=greedy,
        greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
        all_greedy=all(greedy),
        temperature=col([1.0 if p.greedy else p.temperature for p in ps]),
        filters=filters,
        needs_sort=needs_sort,
        rep_penalty=rep_penalty,
        seen=seen,
        presence=presence,
        frequency=frequency,
        counts=counts,
        suppress=suppress,
        bias=bias,
        allowed=allowed,
    )


def filter_probs(
    probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Apply top-k, then top-p (on the top-k renormalised mass), then min-p; return renormalised probs.

    probs: [B, V] rows summing to 1 (after temperature). top_k: [B] int, <= 0 disables.
    top_p: [B] in (0, 1], 1 disables. min_p: [B] in [0, 1], 0 disables. The best token always stays.
    """
    V = probs.shape[-1]
    sorted_p, order = probs.sort(dim=-1, descending=True)  # [B, V]
    rank = torch.arange(V, device=probs.device)  # [V]
    k = torch.where(top_k > 0, top_k, V).clamp(max=V)  # [B]
    keep = rank.unsqueeze(0) < k.unsqueeze(1)  # [B, V]
    in_k = sorted_p * keep
    # Mass strictly before each token, within the top-k: keep the smallest prefix reaching top_p.
    cum = in_k.cumsum(dim=-1)  # [B, V]
    before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1) / cum[:, -1:]
    keep &= before < top_p.unsqueeze(1)
    # min-p compares against the best token; the ratio is unchanged by renormalising, so order is free.
    keep &= sorted_p >= min_p.unsqueeze(1) * sorted_p[:, :1]
    keep[:, 0] = True
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep)  # [B, V]
    return kept / kept.sum(dim=-1, keepdim=True)


def _min_p_only(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """filter_probs with only min-p in use: no sort needed."""
    # probs: [B, V]
    kept = probs * (probs >= min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True))
    return kept / kept.sum(dim=-1, keepdim=True)


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """logit_bias, the structured-output mask, repetition, presence/frequency penalties and min_tokens
    suppression on a fp32 copy of logits."""
    x = logits.to(torch.float32, copy=True)  # [B, V]; the caller's logits stay untouched
    if b.bias is not None:
        rows, cols, values = b.bias
        x.index_put_((rows, cols), values, accumulate=True)
    if b.allowed is not None:
        ops.mask_rows(x, *b.allowed)
    if b.rep_penalty is not None and b.seen is not None:
        # HF rule: shrink positive logits, push negative ones further down.
        hit = torch.where(x > 0, x / b.rep_penalty, x * b.rep_penalty)
        x = torch.where(b.seen, hit, x)
    if b.counts is not None and b.presence is not None and b.frequency is not None:
        # OpenAI rule, over the output only.
        x -= b.frequency * b.counts + b.presence * (b.counts > 0)
    if b.suppress is not None:
        x[b.suppress] = float("-inf")
    return x


class Sampler:
    """Picks one token per row. Stateless: every request's state arrives with the call."""

    def __call__(self, logits: torch.Tensor, states: list[SamplingState],
                 allowed: tuple[torch.Tensor, torch.Tensor] | None = None) -> SamplerOutput:
        # logits: [B, V] any float dtype
        return self.sample(logits, prepare(states, logits.shape[-1], logits.device, allowed))

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        # logits: [B, V]
        if batch.plain_greedy:
            tokens = ops.argmax(logits)  # [B]
        else:
            x = apply_penalties(logits, batch)  # [B, V] fp32
            best = ops.argmax(x)  # [B]
            tokens = best if batch.all_greedy else torch.where(batch.greedy, best, self._draw(x, batch))
        token_ids = tokens.tolist()  # the one host sync of the step (two when logprobs are asked for)
        return SamplerOutput(token_ids, self._logprobs(logits, tokens, token_ids, batch))

    @staticmethod
    def _draw(x: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        # x: [B, V] penalised logits -> [B] sampled tokens (greedy rows get a meaningless value)
        probs = torch.softmax(x / b.temperature, dim=-1)  # [B, V]
        if b.filters is not None:
            top_k, top_p, min_p = b.filters
            probs = filter_probs(probs, top_k, top_p, min_p) if b.needs_sort else _min_p_only(probs, min_p)
        # Exponential race (argmax p / q, q ~ Exp(1)) draws exactly from probs; each row's noise
        # comes only from its own generator, so a seeded row ignores its neighbours.
        B, V = probs.shape
        q = torch.ones_like(probs)  # [B, V]
        shared = []
        for i, g in enumerate(b.generators):
            if b.greedy_rows[i]:
                continue  # greedy rows draw nothing, so a seeded greedy row leaves its generator untouched
            if g is None:
                shared.append(i)
            else:
                q[i] = torch.empty(V, device=g.device).exponential_(generator=g).to(probs.device)
        if shared:
            idx = torch.tensor(shared, device=probs.device)
            q[idx] = torch.empty(len(shared), V, device=probs.device).exponential_()
        # q is never 0 in practice; the clamp keeps 0 / 0 from turning into a NaN that argmax would pick.
        return (probs / q.clamp_min(1e-30)).argmax(dim=-1)

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, tokens: torch.Tensor, token_ids: list[int], b: SamplingBatch
    ) -> list[TokenLogprobs | None]:
        # logits: [B, V] raw; tokens: [B]
        n_max = b.max_logprobs
        if n_max < 0:
            return [None] * len(b.logprobs_n)
        lp = torch.log_softmax(logits.to(torch.float32), dim=-1)  # [B, V]
        chosen = lp.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()  # [B]
        top_v: list[list[float]] = [[] for _ in b.logprobs_n]
        top_i: list[list[int]] = [[] for _ in b.logprobs_n]
        if n_max > 0:
            vals, ids = lp.topk(n_max, dim=-1)  # [B, n_max], sorted best first
            top_v, top_i = vals.tolist(), ids.tolist()
        out: list[TokenLogprobs | None] = []
        for row, n in enumerate(b.logprobs_n):
            if n is None:
                out.append(None)
                continue
            top = list(zip(top_i[row][:n], top_v[row][:n], strict=True))
            out.append(TokenLogprobs(token_ids[row], chosen[row], top))
        return out
