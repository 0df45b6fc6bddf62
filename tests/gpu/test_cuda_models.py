"""Whole models on a CUDA GPU (skipped without one): the default path there — Triton attention, CUDA graphs,
quantized weights kept quantized — against ember's CPU fp32 path on the same file, and NF4 through
bitsandbytes' CUDA kernels."""

from __future__ import annotations

import pytest
import torch

import ember
from ember import SamplingParams
from tests.models.tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("cuda") / "tiny.gguf", arch="qwen2", tied=False)


def test_default_gpu_path_matches_the_cpu(path):
    gpu = ember.load(path, device="cuda", dtype="float32")
    cpu = ember.load(path, device="cpu", dtype="float32")
    runner = gpu.engine.runner
    assert runner.triton and runner.graphs is not None and runner.graphs.graphs  # captured at start
    ids = list(range(5, 60))
    torch.testing.assert_close(gpu.logits(ids).cpu(), cpu.logits(ids), atol=1e-3, rtol=1e-3)
    prompts = [[5, 17, 200, 33] * 5, [90, 12, 255, 1, 64, 100, 7], [3]]
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert [o.token_ids for o in gpu.generate(prompts, p)] == [o.token_ids for o in cpu.generate(prompts, p)]


def test_bf16_and_nf4_run(path):
    pytest.importorskip("bitsandbytes")
    ref = ember.load(path, device="cuda", dtype="bfloat16")
    nf4 = ember.load(path, device="cuda", quantize="nf4")
    ids = list(range(5, 40))
    a, b = ref.logits(ids).float(), nf4.logits(ids).float()
    assert torch.isfinite(b).all()
    assert (a - b).abs().mean() < 0.25 * a.abs().mean()  # 4-bit weights: close, not equal
