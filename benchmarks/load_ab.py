"""A/B a load-time setting on decode speed in one process: the same model loaded twice, decoded alternately.

    python benchmarks/load_ab.py -m model.gguf --a EMBER_ACT_BITS=16 --b EMBER_ACT_BITS=8
    python benchmarks/load_ab.py -m llama-1b-Q5_K_M.gguf --a EMBER_COMPACT=0 --b EMBER_COMPACT=1 --prefill 128

A is loaded with the `--a` environment variables set, B with `--b`; each round decodes --tokens greedy tokens
with A, then with B (then B first next round), so a noisy machine (shared vCPUs, steal time) slows both alike.
Prints each round's tok/s, the median of each and the median of the per-round ratios B / A; with --prefill N
also a fresh N-token prompt per round (its prefix cache reset), the same way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import ember


def load(model: str, env: list[str]) -> ember.LLM:
    saved = dict(os.environ)
    os.environ.update(kv.split("=", 1) for kv in env)
    try:
        return ember.load(model)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def decode_tps(llm: ember.LLM, tokens: int) -> float:
    params = ember.SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    t0 = time.perf_counter()
    out = llm.generate("The history of the city", params)
    n = len(out[0].token_ids)
    return n / (time.perf_counter() - t0)


def prefill_tps(llm: ember.LLM, tokens: int) -> float:
    llm.engine.kv.pool.reset_prefix_cache()  # the whole prompt is computed every round
    t0 = time.perf_counter()
    llm.generate([list(range(1000, 1000 + tokens))], ember.SamplingParams(temperature=0, max_tokens=1))
    return tokens / (time.perf_counter() - t0)


def report(what: str, tps: dict[str, list[float]], args: argparse.Namespace) -> None:
    ratios = [b / a for a, b in zip(tps["A"], tps["B"], strict=True)]
    print(f"{what}: A {' '.join(args.a) or '(as is)'}: median {statistics.median(tps['A']):.1f} tok/s; "
          f"B {' '.join(args.b) or '(as is)'}: median {statistics.median(tps['B']):.1f} tok/s; "
          f"B / A median {statistics.median(ratios):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--a", nargs="*", default=[], help="VAR=VALUE set while loading A")
    ap.add_argument("--b", nargs="*", default=[], help="VAR=VALUE set while loading B")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--prefill", type=int, default=0, help="also time a fresh prompt of this many tokens")
    args = ap.parse_args()
    llms = {"A": load(args.model, args.a), "B": load(args.model, args.b)}
    for llm in llms.values():
        decode_tps(llm, 8)  # warm-up
    tps: dict[str, list[float]] = {"A": [], "B": []}
    pre: dict[str, list[float]] = {"A": [], "B": []}
    for r in range(args.rounds):
        for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
            tps[name].append(decode_tps(llms[name], args.tokens))
            if args.prefill:
                pre[name].append(prefill_tps(llms[name], args.prefill))
        print(f"round {r}: A {tps['A'][-1]:.1f} tok/s, B {tps['B'][-1]:.1f} tok/s")
    report("decode", tps, args)
    if args.prefill:
        report(f"prefill {args.prefill}", pre, args)


if __name__ == "__main__":
    main()
