"""Tiny random Llama-family GGUF files: ember's logits equal transformers' (loading the same file, fp32)
through prefill, decode and a batch of 2 — for Llama (permuted Q/K, tied head) and Qwen2 (q/k/v bias,
separate head)."""

from __future__ import annotations

import pytest
import torch

import ember
from ember import SamplingParams
from tests.reference import generate_in_chunks, load_reference, reference_greedy

from .tiny_gguf import write_tiny_gguf

transformers = pytest.importorskip("transformers")

CASES = [("llama", True), ("qwen2", False)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{'tied' if t else 'untied'}" for a, t in CASES])
def pair(request, tmp_path_factory):
    arch, tied = request.param
    path = write_tiny_gguf(tmp_path_factory.mktemp(arch) / f"tiny-{arch}.gguf", arch=arch, tied=tied)
    ours = ember.load(path, dtype="float32")
    return ours, load_reference(path)


def test_config_read(pair):
    ours, _ = pair
    c = ours.config
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size) == (2, 4, 2, 16, 64)
    assert c.attention_bias == (c.architecture == "qwen2")
    assert c.tie_word_embeddings == (c.architecture == "llama")


def test_prefill_logits_match(pair):
    ours, ref = pair
    ids = [5, 17, 200, 33, 90, 12, 255, 1, 64, 100]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    got = ours.logits(ids)
    assert (got - want).abs().max().item() < 1e-4


def test_decode_and_batch_of_two_match(pair):
    ours, ref = pair
    prompts = [[5, 17, 200, 33], [90, 12, 255, 1, 64, 100, 7]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    batched = ours.generate(prompts, params)  # two sequences through prefill + 11 decode steps together
    for p, out in zip(prompts, batched, strict=True):
        assert out.token_ids == reference_greedy(ref, p, 12)


def test_chunked_prefill_matches(pair):
    ours, _ = pair
    ids = list(range(3, 3 + 40))
    whole = ours.logits(ids)[-1]
    out = generate_in_chunks(ours, ids, 7, SamplingParams(temperature=0, max_tokens=1, logprobs=1))  # 6 chunks
    assert out.token_ids[0] == int(whole.argmax())
    assert abs(out.logprobs[0].logprob - float(torch.log_softmax(whole, -1).max())) < 1e-4


def test_half_precision_gguf_runs_in_bf16_where_the_cpu_has_it(tmp_path):
    """An F16 GGUF states its dtype as an HF directory's torch_dtype does: bf16 on a CPU with fast bf16 (half
    the bytes a decode step streams: a Llama-3.2-1B shape went 2.5 -> 5.1-5.8 tok/s), fp32 elsewhere; the
    logits stay close to the fp32 run's."""
    from ember.config import cpu_has_fast_bf16
    from ember.weights.gguf import GGUFFile

    path = write_tiny_gguf(tmp_path / "tiny-f16.gguf", dense_kind="F16")
    assert GGUFFile(path).half_dtype == torch.float16
    assert GGUFFile(write_tiny_gguf(tmp_path / "mixed.gguf")).half_dtype is None  # mostly F32 / Q8_0
    auto, ref = ember.load(path), ember.load(path, dtype="float32")
    assert auto.dtype == (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32) and ref.dtype == torch.float32
    ids = [5, 17, 200, 33, 90, 12]
    got, want = auto.logits(ids).float(), ref.logits(ids)
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()
