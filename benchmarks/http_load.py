"""Load an OpenAI-compatible server with N concurrent streaming completions; print aggregate tok/s and TTFT.

    ember serve --port 8123 &
    python benchmarks/http_load.py --url http://127.0.0.1:8123/v1 --model smollm2-135m -c 1 -c 16 -c 64

Each request streams `--gen-len` tokens (ignore_eos) after a distinct prompt; tokens are counted from the
usage the server reports at the end (stream_options.include_usage), else one per SSE chunk with text.
Works against any server speaking the OpenAI completions API.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx

TEXT = "The history of the city stretches back thousands of years, from a small settlement on the river "


async def one(client: httpx.AsyncClient, url: str, model: str, i: int, gen: int, t0: float) -> tuple[float, int]:
    body = {"model": model, "prompt": f"{i}. " + TEXT * 2, "max_tokens": gen, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    first, chunks, usage = None, 0, None
    async with client.stream("POST", url + "/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"]["completion_tokens"]
            if ev["choices"] and ev["choices"][0]["text"]:
                chunks += 1
                first = first or time.perf_counter() - t0
    return first or float("nan"), chunks if usage is None else usage  # a chunk may carry several tokens


async def run(url: str, model: str, concurrency: int, gen: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        await one(client, url, model, -1, 4, time.perf_counter())  # warm-up
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(client, url, model, i, gen, t0) for i in range(concurrency)))
        wall = time.perf_counter() - t0
    ttft = sorted(r[0] * 1e3 for r in res)
    return {"concurrency": concurrency, "tok_s": sum(r[1] for r in res) / wall, "ttft_p50": statistics.median(ttft),
            "ttft_p99": ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("-c", "--concurrency", type=int, action="append", default=None)
    ap.add_argument("--gen-len", type=int, default=64)
    args = ap.parse_args()
    print("| clients | aggregate tok/s | TTFT p50 ms | TTFT p99 ms |\n|---:|---:|---:|---:|")
    for c in args.concurrency or [1, 16, 64]:
        r = asyncio.run(run(args.url, args.model, c, args.gen_len))
        print(f"| {c} | {r['tok_s']:.0f} | {r['ttft_p50']:.0f} | {r['ttft_p99']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
