"""Decode speed under a JSON-schema constraint against the same run unconstrained, at 1 and N streams; and
the time from a typical tool schema to its first token mask.

    python benchmarks/structured.py [-m smollm2-135m] [--streams 1 16] [--tokens 128] [--trials 3]

Each trial runs the unconstrained and the constrained batch back to back (A/B in one process, alternating),
for the same number of tokens: the schema asks for an array of >= 1000 objects, which cannot close before
--tokens, so every row decodes to the end under a live mask (strings, integers, keys). Decode tok/s counts the
tokens after each batch's first step (prefill excluded). --overlap fills the masks on a worker thread during
the forward pass (the default on accelerators; on a CPU ember fills them inline after it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import ember
from ember import SamplingParams
from ember.structured.spec import StructuredOutputs

LONG = {"type": "object", "properties": {"rows": {"type": "array", "minItems": 1000, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 16}, "score": {"type": "integer"},
                                     "ok": {"type": "boolean"}},
    "required": ["name", "score", "ok"], "additionalProperties": False}}}, "required": ["rows"]}
TOOL = {"type": "object", "properties": {
    "location": {"type": "string", "description": "City and country, e.g. Paris, France"},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 14}}, "required": ["location", "unit"]}


def decode_rate(llm: ember.LLM, prompts: list[list[int]], params: SamplingParams) -> float:
    """Tokens per second over every step after the first one that sampled all rows."""
    eng = llm.engine
    ids = [eng.add_request(p, params) for p in prompts]
    left, first_done, t_start, n = set(ids), set(), 0.0, 0
    while left:
        outs = eng.step()
        now = time.perf_counter()
        for o in outs:
            if o.request_id not in first_done:
                first_done.add(o.request_id)
                if len(first_done) == len(ids):
                    t_start = now
            elif t_start:
                n += len(o.token_ids)
            if o.finished:
                left.discard(o.request_id)
    return n / (time.perf_counter() - t_start)


def compile_ms(llm: ember.LLM) -> tuple[float, float]:
    """(ms from a tool schema to a compiled matcher and its first mask, ms of that first mask alone)."""
    backend = llm.engine.grammars
    backend.ll_tokenizer()  # built once per model, not per request
    t0 = time.perf_counter()
    con = backend.compile(StructuredOutputs(json=TOOL))
    t1 = time.perf_counter()
    backend.fill([con])
    t2 = time.perf_counter()
    return 1e3 * (t2 - t0), 1e3 * (t2 - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--overlap", action="store_true")
    a = ap.parse_args()
    llm = ember.load(a.model)
    llm.engine.grammars.overlap = a.overlap
    t = sorted(compile_ms(llm) for _ in range(5))[2]
    print(f"tool schema -> matcher + first mask: {t[0]:.2f} ms (first mask {t[1]:.3f} ms), median of 5")
    free = SamplingParams(temperature=0, max_tokens=a.tokens, ignore_eos=True)
    bound = SamplingParams(temperature=0, max_tokens=a.tokens, structured={"json": LONG})
    print("| streams | unconstrained tok/s | constrained tok/s | ratio |\n|---:|---:|---:|---:|")
    for n in a.streams:
        prompts = [llm.encode(f"Write a long list of players {i} with scores as JSON:") for i in range(n)]
        decode_rate(llm, prompts, free)  # warm-up
        runs: dict[str, list[float]] = {"free": [], "bound": []}
        for _ in range(a.trials):
            runs["free"].append(decode_rate(llm, prompts, free))
            runs["bound"].append(decode_rate(llm, prompts, bound))
        f, b = statistics.median(runs["free"]), statistics.median(runs["bound"])
        print(f"| {n} | {f:.1f} | {b:.1f} | {b / f:.3f} |")


if __name__ == "__main__":
    main()
