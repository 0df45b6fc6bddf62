"""The kernels must build where they can: outside test_kernels.py, whose tests skip without them."""

from __future__ import annotations

import os

import pytest

from ember.quant import packed


def test_kernels_build_where_they_can():
    """A machine with a compiler and AVX512-BF16 must get the kernels: a broken build fails here, not silently."""
    import shutil
    from pathlib import Path

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if shutil.which("cc") is None or "avx512_bf16" not in flags:
        pytest.skip("no compiler or no AVX512-BF16 here")
    assert packed.available()
    if os.environ.get("EMBER_AMX", "1") != "0":
        assert packed.amx_available() == ("amx_bf16" in flags)
