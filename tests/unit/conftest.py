"""Fixtures the unit tests share."""

from __future__ import annotations

import pytest

from tests.models.tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """A 2-layer random Llama-family GGUF (byte-level vocabulary of 320 tokens), written once."""
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf")
