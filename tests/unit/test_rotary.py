"""Rotary embedding: frequencies (plain, linear, Llama-3) against transformers, rotation against a hand case."""

from __future__ import annotations

import math

import pytest
import torch

from ember.layers.rotary import apply_rope, rope_cos_sin, rope_inv_freq

LLAMA3 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def test_plain_frequencies_hand_computed():
    inv = rope_inv_freq(4, 10000.0, None)
    assert torch.allclose(inv, torch.tensor([1.0, 0.01]))
    assert torch.allclose(rope_inv_freq(4, 10000.0, {"type": "linear", "factor": 2.0}), torch.tensor([0.5, 0.005]))


def test_llama3_frequencies_match_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_scaling = {"rope_type": "llama3", **{k: v for k, v in LLAMA3.items() if k != "type"}}
    cfg = transformers.LlamaConfig(hidden_size=512, num_attention_heads=8, rope_theta=500000.0,
                                   max_position_embeddings=131072, rope_scaling=hf_scaling)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    got = rope_inv_freq(64, 500000.0, LLAMA3)
    assert torch.allclose(got, want.float(), rtol=1e-6)
    assert not torch.allclose(got, rope_inv_freq(64, 500000.0, None))  # scaling changed something


def test_freq_factors_divide():
    factors = torch.tensor([1.0, 2.0, 4.0, 8.0])
    got = rope_inv_freq(8, 10000.0, {"type": "freq_factors"}, factors)
    assert torch.allclose(got, rope_inv_freq(8, 10000.0, None) / factors)


def test_rotation_hand_case():
    # one head, dims (x1, x2) = (1, 0) rotated by position * freq = 1 * 1 rad
    x = torch.tensor([[[1.0, 0.0]]])  # [T=1, H=1, Dh=2]
    cos, sin = rope_cos_sin(torch.tensor([1]), torch.tensor([1.0]), torch.float32)
    out = apply_rope(x, cos, sin)
    assert torch.allclose(out, torch.tensor([[[math.cos(1.0), math.sin(1.0)]]]))
    # partial rotary: dims past 2 * len(freqs) pass through untouched
    x = torch.tensor([[[1.0, 0.0, 5.0, 6.0]]])
    assert torch.equal(apply_rope(x, cos, sin)[..., 2:], torch.tensor([[[5.0, 6.0]]]))
