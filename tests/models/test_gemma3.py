"""Gemma 3 270M (Q4_K_M GGUF) against transformers loading the same file in fp32, including prompts past
the 512-token sliding window (local layers stop seeing the start, global layers still do)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import ember
from ember import SamplingParams
from tests.reference import (
    N_TOKENS,
    PROMPTS,
    assert_fused_step_equals_per_op,
    assert_same_until_near_tie,
    generate_in_chunks,
    load_reference,
    reference_greedy_with_gaps,
)

WINDOW = 512
LONG_TEXT = "Here is a list of facts. " + " ".join(
    f"Fact {i}: the {['red', 'green', 'blue'][i % 3]} box number {i} holds {i * 7 % 13} apples." for i in range(40))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm32(gemma_gguf):
    return ember.load(gemma_gguf, dtype="float32")


@pytest.fixture(scope="module")
def hf_model(gemma_gguf):
    pytest.importorskip("transformers")
    return load_reference(gemma_gguf)


@pytest.fixture(scope="module")
def reference(llm32, hf_model) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and top-2 gaps of the reference for every prompt (computed once)."""
    last_only = partial(hf_model, logits_to_keep=1)  # same last-position logits, without a [S, 262k] head
    return [reference_greedy_with_gaps(last_only, llm32.encode(p), N_TOKENS) for p in PROMPTS]


def test_long_prompt_crosses_the_window(llm32):
    ids = llm32.encode(LONG_TEXT)
    assert WINDOW + 50 < len(ids) < 700
    assert llm32.config.extra["sliding_window"] == WINDOW
    assert llm32.config.extra["layer_types"].count("full_attention") == 3  # layers 5, 11, 17


@pytest.mark.parametrize("text", [PROMPTS[0], LONG_TEXT], ids=["short", "long"])
def test_logits_within_1e3(llm32, hf_model, text):
    ids = llm32.encode(text)
    ours = llm32.logits(ids)  # [S, V]
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].float()
    assert ours.shape == ref.shape
    assert (ours[-1] - ref[-1]).abs().max().item() < 1e-3
    assert (ours - ref).abs().max().item() < 1e-3  # every position, before and after the window


def test_greedy_tokens_match_transformers(llm32, reference):
    params = SamplingParams(temperature=0, max_tokens=N_TOKENS, ignore_eos=True)
    outs = llm32.generate(PROMPTS, params)  # the five prompts batched together
    for prompt, out, (ref, _) in zip(PROMPTS, outs, reference, strict=True):
        assert out.token_ids == ref, f"{prompt!r}: ember {out.text!r} vs reference {llm32.tokenizer.decode(ref)!r}"


def test_packed_greedy_matches_until_near_tie(gemma_gguf, reference):
    """The default CPU path (bf16 activations, Q4_K/Q5_0/Q8_0 kept packed, Q6_K dense) vs fp32."""
    llm = ember.load(gemma_gguf)
    assert llm.engine.model.layers[0].self_attn.qkv_proj.method.name in ("packed", "int4")
    assert llm.engine.model.refiner is not None  # tied Q8_0 head: exact fp32 top candidates
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=N_TOKENS, ignore_eos=True))
    checked = 0
    for out, (ref, gaps) in zip(outs, reference, strict=True):
        checked += assert_same_until_near_tie(out.token_ids, ref, gaps)
    assert checked >= 40  # the comparison must not be vacuous


def test_chunked_prefill_across_window_matches_one_shot(llm32):
    ids = llm32.encode(LONG_TEXT)
    whole = torch.log_softmax(llm32.logits(ids)[-1], -1)
    out = generate_in_chunks(llm32, ids, 100, SamplingParams(temperature=0, max_tokens=1, logprobs=0))  # chunk 6 straddles 512
    assert out.token_ids[0] == int(whole.argmax())
    assert abs(out.logprobs[0].logprob - float(whole.max())) < 1e-4


def test_decode_across_window_matches_one_shot(llm32):
    prompt = llm32.encode(LONG_TEXT)[: WINDOW - 8]  # decode steps 8.. see the window slide
    n = 24
    out = llm32.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0))[0]
    want = torch.log_softmax(llm32.logits(prompt + out.token_ids[:-1])[len(prompt) - 1 :], -1)  # [n, V]
    assert out.token_ids == want.argmax(-1).tolist()
    got = torch.tensor([lp.logprob for lp in out.logprobs])
    assert (got - want.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]).abs().max() < 1e-4


def test_fused_decode_step_equals_per_op(gemma_gguf):
    """Gemma's all-decode steps run as one C call (sandwich norms, GeGLU, local/global rope, sliding
    window): the same logprobs, bit for bit, as the per-op path — past the 512-token window too."""
    from ember.quant import packed

    if not packed.available():
        pytest.skip("ember's packed kernels are not available here")
    llm = ember.load(gemma_gguf)
    long = llm.encode(" ".join(["The river bends past the old mill and the town beyond it."] * 45))[:515]
    assert_fused_step_equals_per_op(llm, [llm.encode("The capital of France is"), long], 8)
