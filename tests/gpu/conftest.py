"""GPU-path tests. On a machine without CUDA the Triton kernels run in Triton's interpreter on the CPU
(TRITON_INTERPRET=1 must be set before any @triton.jit module is imported: this conftest loads first)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ember.kernels import triton as ember_triton  # noqa: E402

if not ember_triton.available():  # the dev extra installs triton; a bare install skips these
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
