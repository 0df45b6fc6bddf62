"""SmolLM2-135M-Instruct (Q4_1 GGUF) against transformers loading the same file in fp32."""

from __future__ import annotations

import pytest
import torch

import ember
from ember import SamplingParams
from tests.reference import (
    N_TOKENS,
    PROMPTS,
    assert_same_until_near_tie,
    load_reference,
    reference_greedy,
    reference_greedy_with_gaps,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm32(smollm_gguf):
    return ember.load(smollm_gguf, dtype="float32")


@pytest.fixture(scope="module")
def hf_model(smollm_gguf):
    pytest.importorskip("transformers")
    return load_reference(smollm_gguf)


def test_greedy_tokens_match_transformers(llm32, hf_model):
    params = SamplingParams(temperature=0, max_tokens=N_TOKENS, ignore_eos=True)
    outs = llm32.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ref = reference_greedy(hf_model, llm32.encode(prompt), N_TOKENS)
        assert out.token_ids == ref, f"{prompt!r}: ember {out.text!r} vs reference {llm32.tokenizer.decode(ref)!r}"
        assert out.finish_reason == "length" and out.usage.completion_tokens == N_TOKENS


def test_packed_greedy_matches_until_near_tie(smollm_gguf, hf_model, cpu_backend):
    """The default CPU path (Q4_1/Q8_0 blocks kept packed, bf16 activations) against the fp32 reference,
    on ember's kernels and on the plain PyTorch fallback (torch's int4 kernel)."""
    llm = ember.load(smollm_gguf)
    expect = "packed" if cpu_backend == "kernels" else "int4"
    assert llm.engine.model.layers[0].mlp.down_proj.method.name == expect
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=N_TOKENS, ignore_eos=True))
    checked = 0
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ref, gaps = reference_greedy_with_gaps(hf_model, llm.encode(prompt), N_TOKENS)
        checked += assert_same_until_near_tie(out.token_ids, ref, gaps)
    assert checked >= 40  # the comparison must not be vacuous


def test_last_logits_within_1e3(llm32, hf_model):
    for prompt in PROMPTS[:3]:
        ids = llm32.encode(prompt)
        ours = llm32.logits(ids)  # [S, V]
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0].float()
        assert ours.shape == ref.shape
        assert (ours[-1] - ref[-1]).abs().max().item() < 1e-3
        assert (ours - ref).abs().max().item() < 1e-3  # every position, not only the last


def test_chat_capital_of_france(llm32):
    out = llm32.chat([{"role": "user", "content": "What is the capital of France?"}],
                     SamplingParams(temperature=0, max_tokens=32))
    assert "Paris" in out.text
    assert out.finish_reason in ("stop", "length")
