"""ember's fused CPU ops (csrc/cpu_ops.c), built on first use with the system C compiler and loaded with ctypes.

`cpu_ops()` returns the loaded library, or None when it cannot be had (no compiler, not x86/ARM Linux or
macOS, EMBER_KERNELS=0): every caller keeps a plain PyTorch path, so a missing compiler costs speed,
never correctness. The build is cached under $EMBER_HOME/kernels, keyed by the source, the compiler, the
target and this CPU's flags. The target is this CPU (-march=native) unless EMBER_KERNEL_MARCH names another
(e.g. x86-64-v3: AVX2 + FMA + F16C, what a laptop without AVX512 has), so one machine can build and test what
another CPU gets; EMBER_KERNEL_FLAGS adds compiler flags (e.g. `-mavx512vl -mavx512vnni` on top of x86-64-v3
tests the AVX-VNNI code path of the AVX2 build on an AVX512 CPU).

Which vector code runs is fixed by that target (csrc/common.h): AVX512-VNNI/BF16 (+ AMX), AVX2 (+ AVX-VNNI),
or plain C; `isa()` names it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).with_name("csrc")
SOURCES = sorted(CSRC.glob("*.c"))  # every C file of the folder, with the headers beside them
FLAGS = ["-O3", "-fopenmp", "-ffast-math", "-fno-finite-math-only", "-shared", "-fPIC"]

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float
SIGNATURES = {
    "ember_add_rmsnorm": [_P, _P, _P, _P, _F, _I, _I, _P, _P],
    "ember_rope_store": [_P, _I, _I, _I, _I, _I, _P, _P, _P, _P, _F, _P, _P, _I, _P],
    "ember_act_mul": [_P, _P, _I, _I, ctypes.c_int],
    "ember_decode_attention": [_P, _I, _P, _P, _I, _P, _P, _P, _I, _I, _I, _I, _I, _F, _I, _F, _P],
    "ember_qtile_matmul": [_P, _I, _P, _P, _P, _I, _I, _I, _I, _P, _P, _I],
    "ember_qtile_rows_f32": [_P, _I, _P, _P, _P, _I, _I, _P],
    "ember_decode_step": [_P, _P, _P, _P, _P, _P, _P, _I, _I, _P, _P],
    "ember_topk_rows": [_P, _I, _I, _I, _P, _P],
    "ember_argmax_rows": [_P, _I, _I, _P],
    "ember_mask_rows": [_P, _I, _P, _I, _P, _I],
    "ember_gguf_decode": [_I, _P, _I, _I, _P, _P, _P],
    "ember_qtile_pack": [_P, _P, _P, _I, _I, _I, _I, _I, _P, _P, _P],
    "ember_gguf_pack": [_I, _P, _I, _I, _I, _I, _P, _P, _P],
    "ember_gguf_pack_ks": [_I, _P, _I, _I, _I, _P, _P, _P],
    "ember_bf16_pack": [_P, _I, _I, _P],
    "ember_bf16_matmul": [_P, _P, _I, _I, _I, _I, _P, _P],
    "ember_bf16_rows_f32": [_P, _P, _I, _I, _P],
}


def _cpu_key() -> str:
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def march() -> str:
    """The -march the kernels are built for: this CPU, or $EMBER_KERNEL_MARCH (x86-64-v3 = AVX2, ...)."""
    return os.environ.get("EMBER_KERNEL_MARCH") or "native"


def extra_flags() -> list[str]:
    return shlex.split(os.environ.get("EMBER_KERNEL_FLAGS", ""))


def build(cc: str, out: Path, target: str | None = None, extra: list[str] | None = None) -> None:
    """Compile the kernels for -march=target (default: march()) into the library `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    flags = extra_flags() if extra is None else extra
    subprocess.run([cc, *FLAGS, f"-march={target or march()}", *flags, *map(str, SOURCES), "-o", str(tmp), "-lm"],
                   check=True, capture_output=True, text=True)
    os.replace(tmp, out)  # atomic: a concurrent process sees either no library or a whole one


def load(path: Path) -> ctypes.CDLL:
    """A built kernel library with its functions' signatures set."""
    lib = ctypes.CDLL(str(path))
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    for name in ("ember_qtile_available", "ember_qtile_amx_built", "ember_amx_available", "ember_topk_rows",
                 "ember_argmax_rows", "ember_isa", "ember_bf16_available"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


@functools.cache
def cpu_ops() -> ctypes.CDLL | None:
    if os.environ.get("EMBER_KERNELS", "1") == "0" or sys.platform not in ("linux", "darwin"):
        return None
    cc = compiler()
    if cc is None:
        warnings.warn("ember: no C compiler found, so the fused CPU kernels are off (decoding is slower); "
                      "install gcc (apt install gcc) to turn them on", stacklevel=2)
        return None
    from ember.hub import ember_home

    sources = b"".join(p.read_bytes() for p in sorted(CSRC.iterdir()))
    key = hashlib.sha256(sources + " ".join([cc, *FLAGS, march(), *extra_flags(), _cpu_key(),
                                             torch.__version__]).encode())
    lib_path = ember_home() / "kernels" / f"cpu_ops-{key.hexdigest()[:16]}.so"
    try:
        if not lib_path.exists():
            print("[ember] building the CPU kernels for this machine (once, a few seconds)", file=sys.stderr)
            build(cc, lib_path)
        lib = load(lib_path)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"ember: building the fused CPU kernels failed, using plain PyTorch ops instead:\n{detail}",
                      stacklevel=2)
        return None
    return lib


ISAS = {0: "plain C", 1: "AVX2", 2: "AVX2 + AVX-VNNI", 3: "AVX512-VNNI + BF16", 4: "AVX512-VNNI + BF16 + AMX",
        5: "AVX512-VNNI"}


def isa() -> str:
    """The vector code the kernels run here, for `ember bench` and error messages."""
    lib = cpu_ops()
    if lib is None:
        return "off (plain PyTorch)"
    code = lib.ember_isa()
    if code == 3 and lib.ember_qtile_amx_built() and lib.ember_amx_available():
        code = 4
    return ISAS.get(code, "?")
