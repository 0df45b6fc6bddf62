"""The packed layouts by model size: from ~1B block-quantized weights the compact ones (K-quant layers keep the
file's super-block and integer scales, 5-bit codes take 5 bits), below the wider ones that unpack with fewer
instructions; the same weights either way, so the same greedy tokens and logits within the kernel's rounding."""

from __future__ import annotations

import pytest
import torch

import ember
from ember import SamplingParams
from ember.errors import ParameterError
from ember.quant import packed


def layouts(llm: ember.LLM) -> tuple[set[bool], set[bool]]:
    """(K-quant scales, 5-bit layout) flags over the model's packed layers."""
    layers = list(packed.packed_layers(llm.engine.model))
    return {m.ks for m in layers}, {m.five for m in layers}


@pytest.mark.skipif(not packed.available(), reason="needs ember's kernels")
def test_compact_from_1b_weights_same_numbers(gemma_gguf, monkeypatch):
    """Gemma 3 270M Q4_K_M: Q5_0 q/k/gate/up (5-bit), Q4_K / Q6_K o and down (K-quant scales)."""
    monkeypatch.delenv("EMBER_COMPACT", raising=False)
    wide = ember.load(gemma_gguf, act_bits=16)
    assert layouts(wide) == ({False}, {False})  # 270M: the wide layouts
    monkeypatch.setattr(packed, "COMPACT_FROM_WEIGHTS", 10**8)  # as if it were a 1B model
    compact = ember.load(gemma_gguf, act_bits=16)
    assert layouts(compact) == ({False, True}, {False, True})
    monkeypatch.setenv("EMBER_COMPACT", "0")  # the variable overrides the size rule
    assert layouts(ember.load(gemma_gguf, act_bits=16)) == ({False}, {False})
    ids = wide.encode("The history of the city begins with a small fishing village on the river")
    a, b = wide.logits(ids).float(), compact.logits(ids).float()
    assert (a - b).abs().max().item() < 1e-2 * a.abs().max().item() and not torch.equal(a, b)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    assert wide.generate(ids, params)[0].token_ids == compact.generate(ids, params)[0].token_ids


def test_a_bad_compact_setting_is_refused(monkeypatch):
    monkeypatch.setenv("EMBER_COMPACT", "yes")
    with pytest.raises(ParameterError, match="EMBER_COMPACT='yes' is invalid"):
        packed.compact_layouts(10**10)
