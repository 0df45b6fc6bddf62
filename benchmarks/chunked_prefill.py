"""How long running streams wait behind a long prompt, by per-step token budget (chunked prefill).

    python benchmarks/chunked_prefill.py [-m smollm2-135m] [--streams 8] [--prompt-len 2000] [-b 512 -b 256 -b 128]

`--streams` requests decode; then a `--prompt-len` prompt arrives. For each budget: the long prompt's
time to first token, and the streams' largest and median gap between two tokens while it is prefilled.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import ember
from ember import SamplingParams
from ember.bench import prompt_ids


def trial(llm: ember.LLM, budget: int, streams: int, long_ids: list[int]) -> tuple[float, float, float]:
    eng = llm.engine
    eng.config.max_num_batched_tokens = budget
    eng.kv.pool.reset_prefix_cache()
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    for _ in range(streams):
        eng.add_request([random.randrange(100, 40000) for _ in range(32)], params)
    last: dict[str, float] = {}
    for _ in range(5):  # the streams are decoding
        for out in eng.step():
            last[out.request_id] = time.perf_counter()
    long_id = eng.add_request(long_ids, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    t0, ttft, gaps = time.perf_counter(), 0.0, []
    while eng.has_unfinished():
        for out in eng.step():
            now = time.perf_counter()
            if out.request_id == long_id:
                ttft = now - t0
            elif out.request_id in last:
                gaps.append(now - last[out.request_id])
                last[out.request_id] = now
    return ttft, max(gaps), statistics.median(gaps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=2000)
    ap.add_argument("-b", "--budget", type=int, action="append", help="tokens per step (repeatable)")
    ap.add_argument("--trials", type=int, default=2)
    a = ap.parse_args()
    budgets = a.budget or [512, 256, 128]
    random.seed(0)
    llm = ember.load(a.model)
    long_ids = prompt_ids(llm.source, a.prompt_len)  # the prompt text `ember bench` uses
    trial(llm, budgets[0], a.streams, long_ids[:256])  # warm-up
    print(f"{a.streams} streams decoding, then a {len(long_ids)}-token prompt arrives")
    print("| tokens per step | long prompt TTFT ms | streams' largest gap ms | median gap ms |")
    print("|---:|---:|---:|---:|")
    for _ in range(a.trials):
        for b in budgets:
            ttft, worst, med = trial(llm, b, a.streams, long_ids)
            print(f"| {b} | {ttft * 1e3:.0f} | {worst * 1e3:.0f} | {med * 1e3:.0f} |")


if __name__ == "__main__":
    main()
