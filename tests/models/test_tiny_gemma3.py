"""A tiny random Gemma 3 GGUF (6 layers: 5 sliding-window with a 4-token window, 1 global): ember's logits
equal transformers' (loading the same file, fp32) through prefill, decode, a batch of 2 and chunked prefill,
all well past the window."""

from __future__ import annotations

import pytest
import torch

import ember
from ember import SamplingParams
from tests.reference import generate_in_chunks, load_reference

from .tiny_gguf import G_HEAD_DIM, G_LAYERS, G_WINDOW, write_tiny_gemma3_gguf

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 17, 200, 33], [90, 12, 255, 1, 64, 100, 7, 3, 44]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = write_tiny_gemma3_gguf(tmp_path_factory.mktemp("gemma3") / "tiny-gemma3.gguf")
    return ember.load(path, dtype="float32"), load_reference(path)


def _ref_logits(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0]  # [S, V]


def test_config_read(pair):
    ours, ref = pair
    c = ours.config
    assert (c.num_layers, c.head_dim, c.rope_theta) == (G_LAYERS, G_HEAD_DIM, 1e6)
    assert c.extra["sliding_window"] == G_WINDOW
    assert c.extra["layer_types"] == list(ref.config.layer_types)  # the same local/global split
    assert c.extra["layer_types"][-1] == "full_attention"
    assert c.extra["query_pre_attn_scalar"] == ref.config.query_pre_attn_scalar
    assert c.tie_word_embeddings and c.extra["final_logit_softcapping"] is None


def test_prefill_logits_match(pair):
    ours, ref = pair
    ids = [5, 17, 200, 33, 90, 12, 255, 1, 64, 100, 7, 8, 9, 10, 11, 300, 2]  # 4x the window
    assert (ours.logits(ids) - _ref_logits(ref, ids)).abs().max().item() < 1e-4


def test_decode_and_batch_of_two_match(pair):
    ours, ref = pair
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    batched = ours.generate(PROMPTS, params)  # two sequences through prefill + 11 decode steps together
    for p, out in zip(PROMPTS, batched, strict=True):
        # one reference forward over prompt + completion gives the logits behind every decode step
        want = torch.log_softmax(_ref_logits(ref, p + out.token_ids[:-1])[len(p) - 1 :], -1)  # [12, V]
        assert out.token_ids == want.argmax(-1).tolist()
        got = torch.tensor([lp.logprob for lp in out.logprobs])
        assert (got - want.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]).abs().max() < 1e-4


def test_chunked_prefill_matches(pair):
    ours, ref = pair
    ids = list(range(3, 3 + 40))
    want = torch.log_softmax(_ref_logits(ref, ids)[-1], -1)
    out = generate_in_chunks(ours, ids, 7, SamplingParams(temperature=0, max_tokens=1, logprobs=1))  # 6 chunks, each past the window
    assert out.token_ids[0] == int(want.argmax())
    assert abs(out.logprobs[0].logprob - float(want.max())) < 1e-4


def test_final_logit_softcapping(tmp_path):
    # the GGUF key is read by ember; transformers' GGUF loader ignores it, so give it the same value
    path = write_tiny_gemma3_gguf(tmp_path / "tiny-gemma3-softcap.gguf", final_softcap=1.5)
    ours, ref = ember.load(path, dtype="float32"), load_reference(path, final_logit_softcapping=1.5)
    ids = [5, 17, 200, 33, 90, 12, 255]
    got = ours.logits(ids)
    assert got.abs().max() < 1.5
    assert (got - _ref_logits(ref, ids)).abs().max().item() < 1e-4
