"""A/B two versions of ember's C kernels in one process: the working tree against a git revision.

    python benchmarks/kernel_ab.py --base HEAD~1 attention      # decode attention, several batch x keys
    python benchmarks/kernel_ab.py --base HEAD~1 matmul -m 1 -m 16 -m 64   # packed matmul, default model
    python benchmarks/kernel_ab.py --base HEAD~1 matmul -m 16 --all-layers # every layer: weights from memory
    python benchmarks/kernel_ab.py --base HEAD~1 matmul -m 1 --all-layers --model /path/llama-1b-Q4_0.gguf
    python benchmarks/kernel_ab.py --base HEAD~1 select -m 1 -m 16          # top-16 and argmax of logits rows

Both versions are compiled from source with ember's flags into a temporary directory and called
alternately on the same inputs (best of --trials), so a noisy machine (shared vCPUs, steal time) hits
both alike. Outputs are compared too: "same bits" or the largest difference.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from ember.kernels import CSRC, FLAGS, SIGNATURES, extra_flags, march

ROOT = Path(__file__).resolve().parent.parent
BF = torch.bfloat16


def build(rev: str | None, out: Path) -> ctypes.CDLL:
    """The kernel library of git revision `rev` (None: the working tree)."""
    src = CSRC
    if rev is not None:
        src = out.with_suffix("")
        src.mkdir()
        rel = CSRC.relative_to(ROOT)
        listing = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{rev}:{rel}"],
                                 check=True, capture_output=True, text=True).stdout.split()
        for name in listing:
            blob = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{rel}/{name}"], check=True,
                                  capture_output=True).stdout
            (src / name).write_bytes(blob)
    files = sorted(str(p) for p in src.glob("*.c"))
    subprocess.run(["cc", *FLAGS, f"-march={march()}", *extra_flags(), *files, "-o", str(out), "-lm"], check=True)
    lib = ctypes.CDLL(str(out))
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.argtypes, fn.restype = args, None
    return lib


def race(fns: dict[str, Callable[[], torch.Tensor]], trials: int) -> tuple[dict[str, float], str]:
    best, outs = dict.fromkeys(fns, float("inf")), {}
    for i in range(trials):  # each goes first on every other trial (a fixed order favoured the same code by 1-2 %)
        for name, fn in (fns.items() if i % 2 == 0 else reversed(fns.items())):
            t = time.perf_counter()
            outs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t)
    a, b = (outs[name] for name in fns)
    same = "same bits" if torch.equal(a, b) else f"max diff {(a.float() - b.float()).abs().max().item():.2e}"
    return best, same


def _attention_call(lib: ctypes.CDLL, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, slots: torch.Tensor,
                    lens: torch.Tensor) -> torch.Tensor:
    (b, h, dh), (hkv, slots_n, _) = q.shape, kc.shape
    out = torch.empty(b, h, dh, dtype=BF)
    lib.ember_decode_attention(q.data_ptr(), h * dh, kc.data_ptr(), vc.data_ptr(), slots_n, slots.data_ptr(),
                               lens.data_ptr(), slots.shape[1], b, h, hkv, dh, 0.125, 0, 0.0, out.data_ptr())
    return out


def attention(libs: dict[str, ctypes.CDLL], trials: int) -> None:
    h, hkv, dh, slots_n = 9, 3, 64, 40000  # SmolLM2's heads
    g = torch.Generator().manual_seed(0)
    kc, vc = (torch.randn(hkv, slots_n, dh, generator=g).to(BF) for _ in range(2))
    for b, n in ((1, 40), (1, 300), (1, 2000), (16, 60), (16, 1000)):
        pages = [torch.randperm(slots_n // 16, generator=g)[: -(-n // 16)] for _ in range(b)]  # 16-slot pages
        slots = torch.stack([(p[:, None] * 16 + torch.arange(16)).flatten()[:n] for p in pages])
        lens, q = torch.full((b,), n), torch.randn(b, h, dh, generator=g).to(BF)
        best, same = race({k: partial(_attention_call, lib, q, kc, vc, slots, lens) for k, lib in libs.items()},
                          trials)
        base, tree = best.values()
        print(f"attention batch {b} x {n} keys: base {base * 1e6:.0f} us, tree {tree * 1e6:.0f} us, "
              f"tree/base {tree / base:.2f} ({same})")


def _matmul_call(lib: ctypes.CDLL, lin: torch.nn.Module, x: torch.Tensor, amx: bool) -> torch.Tensor:
    from ember.quant import packed

    m = x.shape[0]
    y = torch.empty(m, lin.n_out)
    lib.ember_qtile_matmul(lin.codes.data_ptr(), packed.mode(lin), lin.s16.data_ptr(), lin.o16.data_ptr(),
                           x.data_ptr(), 1, m, lin.n_out, lin.in_features, y.data_ptr(), None,
                           int(m > packed.MAX_GEMV_ROWS and amx))
    return y


def _sweep(lib: ctypes.CDLL, linears: list[torch.nn.Module], xs: list[torch.Tensor], amx: bool) -> torch.Tensor:
    return torch.cat([_matmul_call(lib, lin, x, amx).flatten() for lin, x in zip(linears, xs, strict=True)])


def matmul(libs: dict[str, ctypes.CDLL], rows: list[int], trials: int, all_layers: bool, model: str | None) -> None:
    """One layer's 4 linears (cache-warm weights), or every layer's in turn (weights streamed as in a step)."""
    import ember
    from ember.quant import packed

    llm = ember.load(model)
    amx = packed.amx_available()  # also asks Linux for the AMX state, which both libraries then use
    layers = llm.engine.model.layers if all_layers else llm.engine.model.layers[:1]
    linears = [m for la in layers for m in (la.self_attn.qkv_proj, la.self_attn.o_proj, la.mlp.gate_up_proj,
                                             la.mlp.down_proj)]
    for m in rows:
        xs = [torch.randn(m, lin.in_features) for lin in linears]
        best, same = race({k: partial(_sweep, lib, linears, xs, amx) for k, lib in libs.items()}, trials)
        base, tree = best.values()
        print(f"matmul {m} rows, {len(linears)} linears: base {base * 1e3:.3f} ms, tree {tree * 1e3:.3f} ms, "
              f"tree/base {tree / base:.2f} ({same})")


def _select_call(lib: ctypes.CDLL, x: torch.Tensor, argmax: bool) -> torch.Tensor:
    b, n = x.shape
    if argmax:
        idx = torch.empty(b, dtype=torch.int64)
        lib.ember_argmax_rows(x.data_ptr(), b, n, idx.data_ptr())
        return idx
    vals, idx = torch.empty(b, 16), torch.empty(b, 16, dtype=torch.int64)
    lib.ember_topk_rows(x.data_ptr(), b, n, 16, vals.data_ptr(), idx.data_ptr())
    return idx


def select(libs: dict[str, ctypes.CDLL], rows: list[int], trials: int) -> None:
    """Top-16 and argmax over logits rows of SmolLM2's vocabulary (49152), as the sampler calls them."""
    for m in rows:
        x = torch.randn(m, 49152, generator=torch.Generator().manual_seed(m))
        for argmax in (False, True):
            best, same = race({k: partial(_select_call, lib, x, argmax) for k, lib in libs.items()}, trials)
            base, tree = best.values()
            print(f"{'argmax' if argmax else 'top-16'} {m} rows: base {base * 1e3:.3f} ms, tree {tree * 1e3:.3f} ms, "
                  f"tree/base {tree / base:.2f} ({same})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["attention", "matmul", "select"])
    ap.add_argument("--base", default="HEAD", help="git revision to compare the working tree with")
    ap.add_argument("-m", "--rows", type=int, action="append", help="rows for matmul / select (repeatable)")
    ap.add_argument("--all-layers", action="store_true", help="matmul: sweep every layer (weights from memory)")
    ap.add_argument("--model", help="matmul: the model whose linears to run (default: ember's default model)")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"base": build(args.base, Path(tmp) / "base.so"), "tree": build(None, Path(tmp) / "tree.so")}
        if args.what == "attention":
            attention(libs, args.trials)
        elif args.what == "select":
            select(libs, args.rows or [1, 16, 64], args.trials)
        else:
            matmul(libs, args.rows or [1, 16, 64], args.trials, args.all_layers, args.model)


if __name__ == "__main__":
    main()
