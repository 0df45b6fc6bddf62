"""The kernels built for other CPUs than this one: AVX2 (+ AVX-VNNI) laptops and plain x86-64.

EMBER_KERNEL_MARCH / EMBER_KERNEL_FLAGS build what those CPUs get, and an AVX512 machine runs it (its ISA is a
superset), so CI checks every code path of csrc/ on one machine: the whole kernel suite against its PyTorch and
float64 references, and the int8 tile matmul bit for bit against the AVX512 build (the AVX2 kernel computes the
same exact integer block sums and the same float epilogue, so the answer may not depend on the CPU).
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ember import kernels
from ember.quant import packed

CPU = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
FLAGS = set(next((ln for ln in CPU.splitlines() if ln.startswith("flags")), "").split())
HAS_AVX2 = os.uname().machine == "x86_64" and {"avx2", "fma", "f16c"} <= FLAGS and kernels.compiler() is not None
HAS_VNNI256 = HAS_AVX2 and {"avx512vl", "avx512_vnni"} <= FLAGS  # tests the AVX-VNNI path with EVEX encodings
pytestmark = pytest.mark.skipif(not HAS_AVX2, reason="needs an x86-64 CPU with AVX2 and a C compiler")

BUILDS = {  # name: (-march, extra flags, ISA it reports, whether it has the tile kernel)
    "avx2": ("x86-64-v3", "", "AVX2", True),
    "vnni256": ("x86-64-v3", "-mavx512vl -mavx512vnni", "AVX2 + AVX-VNNI", True),
    "plain": ("x86-64", "", "plain C", False),
}


def _skip_unless_runs(name: str) -> None:
    if name == "vnni256" and not HAS_VNNI256:
        pytest.skip("this CPU cannot run AVX512-VL VNNI instructions")


@pytest.mark.parametrize("name", list(BUILDS))
def test_kernel_suite_passes_on_each_build(name, tmp_path):
    """test_kernels.py and test_attention.py, run whole with the kernels built for that CPU: nothing skipped
    where the build has the tile kernel."""
    _skip_unless_runs(name)
    target, extra, isa, tiles = BUILDS[name]
    env = {**os.environ, "EMBER_HOME": str(tmp_path), "EMBER_KERNEL_MARCH": target, "EMBER_KERNEL_FLAGS": extra}
    isa_run = subprocess.run([sys.executable, "-c", "from ember import kernels; print(kernels.isa())"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert isa_run.stdout.strip() == isa, isa_run.stderr[-2000:]
    tests = Path(__file__).parent
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / "test_kernels.py"),
                        str(tests / "test_attention.py")], env=env, capture_output=True, text=True, timeout=600)
    tail = r.stdout[-3000:]
    assert r.returncode == 0, tail
    passed = int(re.search(r"(\d+) passed", tail).group(1))  # type: ignore[union-attr]
    skipped = re.search(r"(\d+) skipped", tail)
    assert passed >= 30 and (skipped is None) == tiles, tail


def test_determinism_on_the_avx2_build(smollm_gguf):
    """tests/models/test_determinism.py with the AVX2 build: the same greedy tokens fresh, after cached
    prefixes, in prefill chunks of any size and in a batch of 16 (the model and kernel caches are shared)."""
    env = {**os.environ, "EMBER_KERNEL_MARCH": "x86-64-v3", "EMBER_KERNEL_FLAGS": ""}
    test = Path(__file__).parents[1] / "models" / "test_determinism.py"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)], env=env,
                       capture_output=True, text=True, timeout=900)
    tail = r.stdout[-3000:]
    assert r.returncode == 0 and " passed" in tail and "skipped" not in tail, tail


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    """The AVX512 build of this machine and the AVX2 builds, loaded side by side."""
    if not packed.available() or "avx512_vnni" not in FLAGS:
        pytest.skip("the reference is the AVX512-VNNI build: this CPU has none")
    d = tmp_path_factory.mktemp("isa")
    out = {"native": kernels.cpu_ops()}
    for name in ("avx2", "vnni256"):
        if name == "vnni256" and not HAS_VNNI256:
            continue
        target, extra = BUILDS[name][:2]
        kernels.build(kernels.compiler(), d / f"{name}.so", target, extra.split())  # type: ignore[arg-type]
        out[name] = kernels.load(d / f"{name}.so")
    assert out["avx2"].ember_isa() == 1
    return out


def _run(lib, codes, mode, s16, o16, x, n, f32):
    m, k = x.shape
    y = torch.zeros(m, n) if f32 else torch.zeros(m, n, dtype=torch.bfloat16)
    lib.ember_qtile_matmul(codes.data_ptr(), mode, s16.data_ptr(), o16.data_ptr(), x.data_ptr(),
                           int(x.dtype == torch.float32), m, n, k, y.data_ptr() if f32 else None,
                           None if f32 else y.data_ptr(), 0)
    return y


def _weights(n, k, bits8, sub16, g, high=None, narrow=0):
    tiles, nb = -(-n // packed.TILE), k // 32
    width = packed.LAYOUT_BYTES[packed.layout_of(5 if narrow == 2 else 6 if narrow else 8 if bits8 else 4)]
    codes = torch.randint(0, 256, (tiles, nb, width), dtype=torch.uint8, generator=g)
    if high is not None:
        codes.fill_(high)
    per = packed.TILE * (2 if sub16 else 1)
    s16 = (torch.rand(tiles, nb, per, generator=g) * 0.02).half()
    o16 = (torch.randn(tiles, nb, per, generator=g) * 0.1).half()
    return codes, s16, o16


@pytest.mark.parametrize("bits8,sub16,two,narrow", [(*c, 0) for c in itertools.product([0, 1], repeat=3)]
                         + [(1, sub16, two, nar) for sub16, two, nar in itertools.product([0, 1], [0, 1], [1, 2])])
def test_tile_matmul_same_bits_as_avx512(libs, bits8, sub16, two, narrow):
    """Every weight layout (nibbles / bytes / bytes below 64, a scale per 32 / 16) and activation mode, 1-17
    rows (the gemv's 4-row groups and their remainders, one or both tile halves at once), a ragged last tile,
    bf16 and fp32 in and out: the same bits."""
    g = torch.Generator().manual_seed(bits8 + 2 * sub16 + 4 * two + 8 * narrow)
    n, k = 40, 256
    codes, s16, o16 = _weights(n, k, bits8, sub16, g, narrow=narrow)  # narrow: 6-bit codes (Q6_K's), 2: 5-bit
    mode = bits8 | sub16 << 1 | two << 2 | (narrow > 0) << 3 | (narrow == 2) << 9
    zexp = {0: 3, 1: 5, 2: 4}[narrow]  # Q4_0's, Q6_K's and Q5_0's: offsets -2^zexp s, computed instead of read
    o_sym = (-(2.0**zexp) * s16.float()).half()
    for m, f32, xdt in itertools.product((1, 3, 5, 17), (True, False), (torch.bfloat16, torch.float32)):
        x = torch.randn(m, k, generator=g).to(xdt)
        want = _run(libs["native"], codes, mode, s16, o16, x, n, f32)
        want_sym = _run(libs["native"], codes, mode, s16, o_sym, x, n, f32)
        for name, lib in libs.items():
            assert torch.equal(_run(lib, codes, mode, s16, o16, x, n, f32), want), (name, m, f32, xdt)
            sym = _run(lib, codes, mode | zexp << 4, s16, torch.empty(0, dtype=torch.half), x, n, f32)
            assert torch.equal(sym, want_sym), (name, m, f32, xdt, "zexp")


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_scales_same_bits_as_avx512(libs, kind):
    """Layers with K-quant scales (fp16 d, dmin per 256, integer scales and mins per 32 or 16): the same bits."""
    from torch import nn

    from ember.weights.base import RawTensor
    from tests.unit.test_gguf_blocks import _random_blocks

    n, k = 40, 512
    layer = nn.Module()
    assert packed.pack_raw(layer, [RawTensor("w", kind, (n, k), _random_blocks(kind, n, k, seed=3), lambda a: a)], None)
    g = torch.Generator().manual_seed(11)
    for two, m, f32 in itertools.product((0, 1), (1, 3, 5, 17), (True, False)):
        layer.act16 = bool(two)
        x = torch.randn(m, k, generator=g)
        args = (layer.codes, packed.mode(layer), layer.s16, layer.o16, x, n, f32)
        want = _run(libs["native"], *args)
        for name, lib in libs.items():
            assert torch.equal(_run(lib, *args), want), (name, two, m, f32)


@pytest.mark.parametrize("code,bits", [(15, 4), (31, 5), (63, 6), (255, 8), (0, 8)])
@pytest.mark.parametrize("two", [0, 1])
def test_tile_matmul_extremes_do_not_saturate(libs, code, bits, two):
    """The largest codes (4, 5, 6, 8 bits) times the most negative activation (-127 in every lane): AVX2 without
    VNNI sums byte products in int16 lanes, which would saturate at 255 * 127 * 2 (or 63 * 127 * 2 summed over
    3 groups); the kernel must not. 8-bit code 0 is the sign trick's extreme: |0 - 128| * 127 * 2 = 32512."""
    g = torch.Generator().manual_seed(7)
    n, k = 16, 64
    bits8, narrow = int(bits > 4), {5: 2, 6: 1}.get(bits, 0)
    codes, s16, o16 = _weights(n, k, bits8, 0, g, high=code and 255, narrow=narrow)  # every code 0 or 2^bits - 1
    x = -torch.ones(2, k)  # every block's h = -127 (and its low part 0)
    s = s16.float()[0].repeat_interleave(32, 0)  # [K, N]: the scale per (k, row)
    o = o16.float()[0].repeat_interleave(32, 0)
    ref = (x.double() @ (code * s + o).double())  # [2, N]: exact, the activations are exactly -127 * d
    for name, lib in libs.items():
        y = _run(lib, codes, bits8 | two << 2 | (narrow > 0) << 3 | (narrow == 2) << 9, s16, o16, x, n, True)
        torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6, msg=name)
