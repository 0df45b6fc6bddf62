"""The packed int8 matmul of each ISA build, timed side by side in one process: this CPU's build (AVX512 here),
the AVX2 build and the AVX2 + AVX-VNNI build (EVEX-encoded, so an AVX512 CPU runs it).

    python benchmarks/isa_matmul.py              # 8192 x 2048, 4-bit / 6-bit / 8-bit codes, 1, 4 and 64 rows

Weights are random tiles (speed does not depend on their values); each library runs the same call in turn,
best of 3 x reps. GB/s is code bytes over time: above DRAM bandwidth the tiles partly sit in cache.
"""

from __future__ import annotations

import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from ember import kernels
from ember.quant import packed


def libraries(d: Path) -> dict:
    libs = {"native": kernels.cpu_ops()}
    for name, (march, extra) in {"avx2": ("x86-64-v3", []),
                                 "vnni256": ("x86-64-v3", ["-mavx512vl", "-mavx512vnni"])}.items():
        kernels.build(kernels.compiler(), d / f"{name}.so", march, extra)  # type: ignore[arg-type]
        libs[name] = kernels.load(d / f"{name}.so")
    return libs


def main() -> None:
    libs = libraries(Path(tempfile.mkdtemp()))
    n, k = 8192, 2048
    for bits, sub16, two in [(4, 0, 1), (4, 0, 0), (6, 1, 1), (8, 0, 1)]:
        layout = packed.layout_of(bits)
        t, nb = n // 16, k // 32
        codes = torch.randint(0, 256, (t, nb, packed.LAYOUT_BYTES[layout]), dtype=torch.uint8)
        per = 32 if sub16 else 16
        s16, o16 = (torch.rand(t, nb, per) * 0.02).half(), (torch.randn(t, nb, per) * 0.1).half()
        mode = int(bits > 4) | sub16 << 1 | two << 2 | int(layout == 2) << 3
        for m in (1, 4, 64):
            x, y = torch.randn(m, k).bfloat16(), torch.empty(m, n, dtype=torch.bfloat16)
            row = []
            args = (codes.data_ptr(), mode, s16.data_ptr(), o16.data_ptr(), x.data_ptr(), 0, m, n, k, None,
                    y.data_ptr(), 0)
            for name, lib in libs.items():
                call = partial(lib.ember_qtile_matmul, *args)
                call()
                reps, best = max(3, 200 // m), float("inf")
                for _ in range(3):
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        call()
                    best = min(best, (time.perf_counter() - t0) / reps)
                row.append(f"{name} {best * 1e3:.2f} ms ({codes.numel() / best / 1e9:.1f} GB/s)")
            print(f"{bits}-bit{' per-16 scales' if sub16 else ''}, {'exact' if two else 'int8'} activations, "
                  f"{m} rows: " + " | ".join(row))


if __name__ == "__main__":
    main()
