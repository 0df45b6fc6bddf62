"""SmolLM2-135M-Instruct (Q4_1 GGUF) against transformers loading the same file in fp32."""

from __future__ import annotations

import pytest
import torch

import ember
from ember import SamplingParams
from tests.reference import reference_greedy

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
]
N_TOKENS = 32

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm32(smollm_gguf):
    return ember.load(smollm_gguf, dtype="float32")


@pytest.fixture(scope="module")
def hf_model(smollm_gguf):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm_gguf.parent), gguf_file=smollm_gguf.name, dtype=torch.float32)
    return model.eval()


def test_greedy_tokens_match_transformers(llm32, hf_model):
    params = SamplingParams(temperature=0, max_tokens=N_TOKENS, ignore_eos=True)
    outs = llm32.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ref = reference_greedy(hf_model, llm32.encode(prompt), N_TOKENS)
        assert out.token_ids == ref, f"{prompt!r}: ember {out.text!r} vs reference {llm32.tokenizer.decode(ref)!r}"
        assert out.finish_reason == "length" and out.usage.completion_tokens == N_TOKENS


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
