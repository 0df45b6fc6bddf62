"""ember's bf16 matmul (F16 / BF16 weights) against torch's bf16 `F.linear` (oneDNN) on the same inputs.

    python benchmarks/bf16_vs_torch.py                 # the Llama-3.2-1B shape's four linears, 1-512 rows
    python benchmarks/bf16_vs_torch.py -m 64 -m 512 --threads 2

Each linear is timed alternately in one process (kernel_ab.race: each goes first every other trial), best
of --trials, and the four are summed. Needs a CPU with AVX512-BF16 (ember's bf16 kernel); elsewhere ember
keeps torch's dense path and there is nothing to compare.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from kernel_ab import race  # benchmarks/ is on sys.path when a script in it runs

from ember.quant import bf16tile

SHAPES = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)]  # (N, K): qkv, o, gate_up, down


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--rows", type=int, action="append", help="activation rows (repeatable)")
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    if not bf16tile.available():
        sys.exit("ember's bf16 kernel is not available on this CPU (it needs AVX512-BF16)")
    torch.set_num_threads(args.threads)
    for m in args.rows or [1, 8, 64, 512]:
        t_ember = t_torch = 0.0
        for n, k in SHAPES:
            w = (torch.randn(n, k) * 0.02).bfloat16()  # w: [N, K]
            tiles = bf16tile.pack_weight(w)
            x = torch.randn(m, k).bfloat16()  # x: [M, K]
            best, _ = race({"ember": lambda: bf16tile.matmul(tiles, x, n, torch.bfloat16),  # noqa: B023
                            "torch": lambda: F.linear(x, w)}, args.trials)  # noqa: B023
            t_ember += best["ember"]
            t_torch += best["torch"]
        print(f"{m} rows: ember {t_ember * 1e3:.2f} ms, torch bf16 {t_torch * 1e3:.2f} ms, "
              f"torch/ember {t_torch / t_ember:.2f}x")


if __name__ == "__main__":
    main()
