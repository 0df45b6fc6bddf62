"""SmolLM2-135M-Instruct (Q4_1 GGUF) against transformers loading the same file in fp32."""

from __future__ import annotations

import pytest
import torch

import ember
from ember import SamplingParams
from ember.quant import packed
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
    """The CPU path with its exact activations (Q4_1/Q8_0 blocks kept packed, bf16 activations split in two
    int8 parts) against the fp32 reference, on ember's kernels and on the plain PyTorch fallback (torch's
    int4 kernel)."""
    llm = ember.load(smollm_gguf, act_bits=16)
    expect = "packed" if cpu_backend == "kernels" else "int4"
    assert llm.engine.model.layers[0].mlp.down_proj.method.name == expect
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=N_TOKENS, ignore_eos=True))
    checked = 0
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ref, gaps = reference_greedy_with_gaps(hf_model, llm.encode(prompt), N_TOKENS)
        checked += assert_same_until_near_tie(out.token_ids, ref, gaps)
    assert checked >= 40  # the comparison must not be vacuous


@pytest.mark.skipif(not packed.available(), reason="needs ember's kernels")
def test_int8_activations_keep_every_clear_decision(smollm_gguf, hf_model):
    """int8 activations (llama.cpp's numerics, the default from 1B weights) move the reference's top-5 logits 0.17 on average
    on these prompts, the exact mode 0.05 (measured), so greedy runs part at smaller gaps. Teacher-forced
    on the reference's own continuation, every position where the reference's top-2 gap is at least 0.6
    must get the reference's token (measured: the widest gap int8 flips is 0.51; the exact mode's 0.02)."""
    llm = ember.load(smollm_gguf, act_bits=8)
    assert {packed.mode(m) >> 2 & 1 for m in llm.engine.model.modules() if hasattr(m, "s16")} == {0}
    checked = 0
    for prompt in PROMPTS:
        ids = llm.encode(prompt)
        ref, gaps = reference_greedy_with_gaps(hf_model, ids, N_TOKENS)
        ours = llm.logits(ids + ref[:-1])[len(ids) - 1:].argmax(-1).tolist()  # ours[i]: after ids + ref[:i]
        clear = [i for i, g in enumerate(gaps) if g >= 0.6]
        assert [ours[i] for i in clear] == [ref[i] for i in clear], prompt
        checked += len(clear)
    assert checked >= 100  # of 160 positions


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
