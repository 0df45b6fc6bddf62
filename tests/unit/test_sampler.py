"""Sampler: filters on a hand-written distribution, penalties on hand-computed logits, seeds, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from ember.engine.sampler import (
    Sampler,
    SamplingState,
    apply_penalties,
    filter_probs,
    prepare,
)
from ember.sampling_params import SamplingParams

# Shuffled on purpose so a filter that forgets to scatter back to vocabulary order fails.
# Sorted: 0.4 (id 1), 0.3 (id 3), 0.15 (id 4), 0.1 (id 0), 0.05 (id 2)
PROBS = [0.1, 0.4, 0.05, 0.3, 0.15]


def _filter(top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> list[float]:
    probs = torch.tensor([PROBS])
    out = filter_probs(probs, torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p]))
    return out[0].tolist()


def _state(params: SamplingParams, prompt=(), output=(), eos=(), seed: int | None = None) -> SamplingState:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingState(params, list(prompt), list(output), gen, frozenset(eos))


# ---- filter_probs -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, PROBS),
        ({"top_k": 2}, [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0]),
        ({"top_k": 1}, [0, 1, 0, 0, 0]),
        ({"top_k": 99}, PROBS),  # k beyond the vocabulary keeps everything
        # before-masses 0, .4, .7, .85: 0.8 keeps three, 0.6 keeps two, 0.1 keeps the best alone
        ({"top_p": 0.8}, [0, 0.4 / 0.85, 0, 0.3 / 0.85, 0.15 / 0.85]),
        ({"top_p": 0.6}, [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0]),
        ({"top_p": 0.1}, [0, 1, 0, 0, 0]),
        # top-p runs on the top-k renormalised mass: within top-3 the before-masses are 0, .47, .82
        ({"top_k": 3, "top_p": 0.8}, [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0]),
        # min-p thresholds: 0.3 * 0.4 = 0.12 keeps three, 0.5 * 0.4 = 0.2 keeps two
        ({"min_p": 0.3}, [0, 0.4 / 0.85, 0, 0.3 / 0.85, 0.15 / 0.85]),
        ({"min_p": 0.5}, [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0]),
        ({"top_k": 4, "top_p": 0.95, "min_p": 0.3}, [0, 0.4 / 0.85, 0, 0.3 / 0.85, 0.15 / 0.85]),
    ],
)
def test_filter_probs_masses(kwargs, expected):
    assert _filter(**kwargs) == pytest.approx(expected, abs=1e-6)


def test_filter_probs_rows_are_independent():
    probs = torch.tensor([PROBS, PROBS[::-1], PROBS])
    out = filter_probs(
        probs, torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.6, 1.0]), torch.tensor([0.0, 0.0, 0.5])
    )
    assert out[0].tolist() == pytest.approx([0, 0.4 / 0.7, 0, 0.3 / 0.7, 0], abs=1e-6)
    assert out[1].tolist() == pytest.approx([0, 0.3 / 0.7, 0, 0.4 / 0.7, 0], abs=1e-6)
    assert out[2].tolist() == pytest.approx([0, 0.4 / 0.7, 0, 0.3 / 0.7, 0], abs=1e-6)


# ---- greedy -------------------------------------------------------------------------------------
def test_greedy_is_argmax_for_any_dtype():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    states = [_state(SamplingParams(temperature=0)) for _ in range(4)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = Sampler()(logits.to(dtype), states)
        assert out.token_ids == logits.to(dtype).float().argmax(-1).tolist()
        assert out.logprobs == [None] * 4


def test_greedy_rows_stay_argmax_in_a_mixed_batch():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.5, top_k=20)] * 3
    out = Sampler()(logits, [_state(p, seed=i) for i, p in enumerate(params)])
    argmax = logits.argmax(-1).tolist()
    assert [out.token_ids[i] for i in (0, 2, 4)] == [argmax[i] for i in (0, 2, 4)]


# ---- penalties ----------------------------------------------------------------------------------
LOGITS = [2.0, -1.0, 0.5, 3.0, -2.0, 0.0]


def _penalised(params: SamplingParams, prompt=(), output=(), eos=()) -> list[float]:
    logits = torch.tensor([LOGITS])
    return apply_penalties(logits, prepare([_state(params, prompt, output, eos)], 6))[0].tolist()


def test_repetition_penalty_hf_rule():
    # prompt + output hit ids 0, 1, 2, 4: positive logits divide by 2, negative ones multiply
    got = _penalised(SamplingParams(repetition_penalty=2.0), prompt=[0, 1], output=[2, 2, 4])
    assert got == pytest.approx([1.0, -2.0, 0.25, 3.0, -4.0, 0.0])


def test_presence_and_frequency_penalties_look_at_output_only():
    # id 2 twice: 0.5 - (0.5 + 2 * 0.25); id 4 once: -2 - (0.5 + 0.25); prompt ids 0, 1 untouched
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    got = _penalised(params, prompt=[0, 1], output=[2, 2, 4])
    assert got == pytest.approx([2.0, -1.0, -0.5, 3.0, -2.75, 0.0])


def test_all_penalties_combined_in_order():
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    got = _penalised(params, prompt=[0, 1], output=[2, 2, 4])
    assert got == pytest.approx([1.0, -2.0, -0.75, 3.0, -4.75, 0.0])


def test_penalties_do_not_modify_the_callers_logits():
    logits = torch.tensor([LOGITS])
    Sampler()(logits, [_state(SamplingParams(temperature=0, repetition_penalty=3.0), output=[3])])
    assert logits[0].tolist() == LOGITS


def test_repetition_penalty_changes_the_greedy_choice():
    # id 3 (3.0) / 2 = 1.5 < id 0 (2.0)
    out = Sampler()(
        torch.tensor([LOGITS]), [_state(SamplingParams(temperature=0, repetition_penalty=2.0), output=[3])]
    )
    assert out.token_ids == [0]


def test_min_tokens_suppresses_eos_and_stop_token_ids():
    eos, stop_id = 3, 0  # the two best logits
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[stop_id])
    assert _penalised(params, output=[5], eos=[eos]) == [-math.inf, -1.0, 0.5, -math.inf, -2.0, 0.0]
    sampler, logits = Sampler(), torch.tensor([LOGITS, LOGITS])
    early = sampler(logits, [_state(params, output=[5], eos=[eos]), _state(params, output=[5, 5], eos=[eos])])
    assert early.token_ids == [2, eos]  # row 2 already has min_tokens outputs
    # sampled rows too: the two best tokens hold ~75% of the mass yet never come out
    sampled = SamplingParams(temperature=1.0, min_tokens=3)
    draws = [
        sampler(logits[:1], [_state(sampled, output=[1], eos=[eos, stop_id], seed=s)]) for s in range(30)
    ]
    assert not {d.token_ids[0] for d in draws} & {eos, stop_id}


# ---- seeded sampling ----------------------------------------------------------------------------
def _run_seeded(seed: int, neighbours: list[SamplingState], steps: int = 30) -> list[int]:
    """Sample `steps` tokens for one seeded request placed in the middle of a batch."""
    logits = torch.randn(steps, 3, 200, generator=torch.Generator().manual_seed(42))
    me = _state(SamplingParams(temperature=0.9, top_p=0.95), seed=seed)
    sampler, toks = Sampler(), []
    for step in range(steps):
        batch = [*neighbours[:1], me, *neighbours[1:]]
        rows = logits[step, : len(batch)].clone()
        rows[len(neighbours[:1])] = logits[step, 1]  # my row is the same whatever the batch
        toks.append(sampler(rows, batch).token_ids[len(neighbours[:1])])
        me.output_token_ids.append(toks[-1])
    return toks


def test_same_seed_repeats_and_ignores_neighbours():
    alone = _run_seeded(7, [])
    assert _run_seeded(7, []) == alone
    neighbours = [
        _state(SamplingParams(temperature=1.2), seed=99),
        _state(SamplingParams(temperature=0.7, top_k=5, presence_penalty=1.0)),  # global RNG
    ]
    assert _run_seeded(7, neighbours) == alone
    assert _run_seeded(7, neighbours[1:] + [_state(SamplingParams(temperature=0))]) == alone
    assert _run_seeded(8, []) != alone  # the seed does matter


def test_sampled_frequencies_match_filtered_distribution():
    # temperature 0.5 on log(PROBS) gives p ~ PROBS**2: .16 (id 1), .09 (id 3), .0225 (id 4), .01, .0025
    params = SamplingParams(temperature=0.5, top_k=4, top_p=0.95)
    # sorted squared masses .16, .09, .0225, .01 (top-4) -> before-masses 0, .566, .885, .965: keep 3
    kept = {1: 0.16, 3: 0.09, 4: 0.0225}
    expected = {t: m / sum(kept.values()) for t, m in kept.items()}
    n_rows, n_steps = 2000, 10
    logits = torch.tensor(PROBS).log().expand(n_rows, -1)
    torch.manual_seed(0)
    counts = [0] * len(PROBS)
    states = [_state(params)] * n_rows
    for _ in range(n_steps):
        for t in Sampler()(logits, states).token_ids:
            counts[t] += 1
    n = n_rows * n_steps
    assert counts[0] == counts[2] == 0  # filtered tokens never drawn
    chi2 = sum((counts[t] - n * p) ** 2 / (n * p) for t, p in expected.items())
    assert chi2 < 13.8  # 2 degrees of freedom, p = 0.001


def test_unfiltered_sampling_follows_temperature():
    n = 20000
    logits = torch.tensor(PROBS).log().expand(n, -1)
    torch.manual_seed(1)
    toks = Sampler()(logits, [_state(SamplingParams(temperature=1.0))] * n).token_ids
    freq = [toks.count(t) / n for t in range(len(PROBS))]
    assert freq == pytest.approx(PROBS, abs=0.015)


# ---- logprobs -----------------------------------------------------------------------------------
def test_logprobs_are_raw_sorted_and_sized_per_row():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(3))
    states = [
        _state(
            SamplingParams(temperature=0, logprobs=5, repetition_penalty=5.0),
            output=[int(logits[0].argmax())],
        ),
        _state(SamplingParams(temperature=0.8, logprobs=0), seed=1),
        _state(SamplingParams(temperature=0)),
    ]
    out = Sampler()(logits.to(torch.bfloat16), states)
    ref = torch.log_softmax(logits.to(torch.bfloat16).float(), -1)
    first, second, third = out.logprobs
    assert third is None
    assert first is not None and second is not None
    # raw: the repetition penalty moved the choice away from the argmax but not the reported logprobs
    assert first.token_id == out.token_ids[0] != int(logits[0].argmax())
    assert first.logprob == pytest.approx(ref[0, first.token_id].item(), abs=1e-5)
    want = torch.topk(ref[0], 5)
    assert [t for t, _ in first.top] == want.indices.tolist()
    assert [lp for _, lp in first.top] == pytest.approx(want.values.tolist(), abs=1e-5)
    assert [lp for _, lp in first.top] == sorted((lp for _, lp in first.top), reverse=True)
    assert second.top == [] and second.logprob == pytest.approx(ref[1, second.token_id].item(), abs=1e-5)
