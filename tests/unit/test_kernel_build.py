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


def test_the_build_target_can_be_another_cpus(tmp_path):
    """EMBER_KERNEL_MARCH builds the kernels for another CPU: here x86-64-v3 (AVX2, FMA, F16C; no AVX512), what
    most laptops have. Its library builds, runs the packed GGUF weights on its AVX2 tile kernel, and generates
    the same tokens as the plain-PyTorch path (no kernels at all)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if shutil.which("cc") is None or "avx2" not in flags or os.uname().machine != "x86_64":
        pytest.skip("no compiler, or not an x86-64 CPU with AVX2")
    from ember.hub import resolve_model

    model = resolve_model("smollm2-135m")  # cached for the session's other tests
    code = (f"import ember, json; from ember.quant import packed; llm = ember.load({str(model)!r}); "
            "out = llm.generate('The capital of France is', ember.SamplingParams(temperature=0, max_tokens=6)); "
            "print(json.dumps([packed.available(), out[0].token_ids]))")

    def run(env: dict[str, str]) -> list:
        import json

        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "EMBER_HOME": str(tmp_path), **env})
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    shutil.copytree(model.parent.parent, tmp_path / "models", dirs_exist_ok=True)  # no second download
    avx2 = run({"EMBER_KERNEL_MARCH": "x86-64-v3"})
    plain = run({"EMBER_KERNELS": "0"})
    assert avx2[0] is True and plain[0] is False and avx2[1] == plain[1]
    assert any(p.name.startswith("cpu_ops-") for p in (tmp_path / "kernels").iterdir())
