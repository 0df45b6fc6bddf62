"""Time to first token with and without a cached prefix: one prompt cold, then prompts sharing its first
`--shared` tokens (the next chat turn, a shared system prompt).

    python benchmarks/prefix_reuse.py [-m smollm2-135m] [--prompt-len 500] [--shared 480] [--trials 3]

Each trial empties the prefix cache, streams the first prompt (all of it computed), then a second prompt
that differs after `--shared` tokens; the engine's own counter says how many positions each computed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import ember
from ember import SamplingParams


def ttft(llm: ember.LLM, ids: list[int]) -> tuple[float, int]:
    """Seconds to the first streamed token of a greedy completion, and the positions the engine computed."""
    before = llm.engine.num_tokens_computed
    t0 = time.perf_counter()
    stream = llm.stream(ids, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    next(iter(stream))
    elapsed = time.perf_counter() - t0
    for _ in stream:  # drain: the request finishes and frees its blocks
        pass
    return elapsed, llm.engine.num_tokens_computed - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--prompt-len", type=int, default=500)
    ap.add_argument("--shared", type=int, default=480)
    ap.add_argument("--trials", type=int, default=3)
    a = ap.parse_args()
    if not 0 < a.shared < a.prompt_len:
        ap.error("--shared must be between 1 and --prompt-len - 1")
    llm = ember.load(a.model)
    text = (Path(__file__).resolve().parents[1] / "tests" / "data" / "prose.txt").read_text()
    ids = llm.encode(text * (1 + 8 * a.prompt_len // len(text)))  # under 4 characters a token: enough
    first = ids[: a.prompt_len]
    second = ids[: a.shared] + ids[a.prompt_len : 2 * a.prompt_len - a.shared]  # same length, new tail
    if second[a.shared] == first[a.shared]:
        raise SystemExit("the two prompts do not part where --shared says; try another --shared")
    ttft(llm, ids[-8:])  # warm-up: kernels built, threads up
    cold, warm = [], []
    for _ in range(a.trials):
        llm.engine.kv.pool.reset_prefix_cache()
        t, n1 = ttft(llm, first)
        cold.append(t)
        t, n2 = ttft(llm, second)
        warm.append(t)
    ms = [f"{x * 1e3:.0f}" for x in cold], [f"{x * 1e3:.0f}" for x in warm]
    print(f"{a.model}: {a.prompt_len}-token prompts, the second sharing its first {a.shared}")
    print(f"cold   TTFT median {statistics.median(cold) * 1e3:.0f} ms (trials {', '.join(ms[0])}), computed {n1} tokens")
    print(f"shared TTFT median {statistics.median(warm) * 1e3:.0f} ms (trials {', '.join(ms[1])}), computed {n2} tokens")


if __name__ == "__main__":
    main()
