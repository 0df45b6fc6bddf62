"""Whole models on the Triton attention path (the GPU's, run here in Triton's interpreter) against ember's
torch path on the same file: Llama (GQA), Qwen2 (biases), Gemma 3 (sliding window, q/k norms), Bloom (ALiBi) — prefill
logits, greedy decode of a batch of 2, chunked prefill and a cached prefix."""

from __future__ import annotations

import json

import pytest
import torch

import ember
from ember import SamplingParams
from ember.errors import ParameterError
from tests.models.tiny_gguf import write_tiny_gemma3_gguf, write_tiny_gguf

ARCHS = ["llama", "qwen2", "gemma3", "bloom"]


def _bloom_dir(d):
    """A tiny Bloom (ALiBi, no rotary: the store-only path) as a Hugging Face directory made by transformers."""
    from ember.tokenizer import Tokenizer
    from ember.weights.gguf_header import read_gguf_metadata
    from tests.models.test_hf_checkpoints import CHATML, make_dir

    tok = d / "tok"
    tok.mkdir()
    Tokenizer.from_gguf_metadata(read_gguf_metadata(write_tiny_gguf(tok / "t.gguf"))).backend.save(
        str(tok / "tokenizer.json"))
    (tok / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "chat_template": CHATML}))
    return make_dir("bloom", d, tok)[1]


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "gemma3":
        path = write_tiny_gemma3_gguf(d / "tiny.gguf")
    elif request.param == "bloom":
        path = _bloom_dir(d)
    else:
        path = write_tiny_gguf(d / "tiny.gguf", arch=request.param, tied=request.param == "llama")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return (ember.load(path, dtype="float32", device=dev, attention="triton"),
            ember.load(path, dtype="float32", device=dev, attention="torch"))


def test_prefill_logits_match(pair):
    tri, ref = pair
    assert tri.engine.runner.triton and not ref.engine.runner.triton
    ids = list(range(5, 45))  # past gemma3's tiny window, over several cache blocks
    torch.testing.assert_close(tri.logits(ids), ref.logits(ids), atol=1e-4, rtol=1e-4)


def test_greedy_batch_chunks_and_cached_prefix(pair):
    tri, ref = pair
    prompts = [[5, 17, 200, 33] * 5, [90, 12, 255, 1, 64, 100, 7]]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = [o.token_ids for o in ref.generate(prompts, params)]
    assert [o.token_ids for o in tri.generate(prompts, params)] == want
    # again: the first prompt's full block now comes from the prefix cache (a chunk over cached keys)
    assert [o.token_ids for o in tri.generate(prompts, params)] == want


def test_bad_attention_value_is_a_clear_error():
    with pytest.raises(ParameterError, match="attention='flash' is invalid"):
        ember.load("smollm2-135m", attention="flash")
