"""`ember bench`: load time, prefill and decode speed, weights GB/s and peak RSS, beside peers.

Each engine runs in its own subprocess (so peak RSS is its own), one after another, on the same GGUF
file, the same prompt token ids and the same thread count: warm-up, then several trials, medians
reported. Peers are optional: transformers (dequantizes GGUF to fp32) and llama.cpp through
llama-cpp-python, each used only when installed.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ENGINES = ("ember", "transformers", "llama.cpp")
TEXT = ("The history of the city stretches back thousands of years, from a small settlement on the river "
        "to a busy port, a seat of kings and finally a modern capital with museums, parks and markets. ")


@dataclass
class Result:
    engine: str
    load_s: float
    prefill_tok_s: float
    decode_tok_s: float
    peak_rss_mb: float
    note: str = ""


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def prompt_ids(model: Path, n: int) -> list[int]:
    """n token ids of plain English text, made with ember's tokenizer (every engine gets these ids)."""
    from ember.tokenizer import Tokenizer
    from ember.weights.gguf_header import read_gguf_metadata

    if model.is_dir():  # a Hugging Face model directory
        tok = Tokenizer.from_hf_dir(model)
    else:
        tok = Tokenizer.from_gguf_metadata(read_gguf_metadata(model))
    ids = tok.encode(TEXT * (1 + n // 20))
    return ids[:n]


def weight_bytes(model: Path) -> int:
    """The size of the weights on disk (a GGUF file, or a directory's weight files)."""
    if model.is_dir():
        return sum(f.stat().st_size for f in model.iterdir() if f.suffix in (".safetensors", ".bin"))
    return model.stat().st_size


# ---- workers (run in a subprocess each) -------------------------------------------------------------
def _ember(model: Path, ids: list[int], gen: int, trials: int) -> Result:
    import warnings

    import ember
    from ember import SamplingParams
    from ember.quant.packed import act_bits_in

    quantize = os.environ.get("EMBER_BENCH_QUANTIZE") or None
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # "already quantized": the driver's header already says ember re-quantizes
        warnings.simplefilter("ignore")
        llm = ember.load(model, quantize=quantize)
    load = time.perf_counter() - t0
    prefill, decode = [], []
    for i in range(trials + 1):  # the first run warms up
        llm.engine.kv.pool.reset_prefix_cache()  # else every trial after the first reuses the prompt's cache
        t = time.perf_counter()
        llm.generate([ids], SamplingParams(temperature=0, max_tokens=1))
        p = len(ids) / (time.perf_counter() - t)
        stamps = []
        for _ in llm.stream(ids, SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True)):
            stamps.append(time.perf_counter())
        if i:
            prefill.append(p)
            decode.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    bits = act_bits_in(llm.engine.model)
    return Result("ember", load, statistics.median(prefill), statistics.median(decode), _peak_rss_mb(),
                  f"{llm.dtype}".removeprefix("torch.") + (f", {quantize} on load" if quantize else "")
                  + (f", act_bits={bits}" if bits else ""))


def _transformers(model: Path, ids: list[int], gen: int, trials: int) -> Result:
    import torch
    import transformers

    t0 = time.perf_counter()
    if model.is_dir():
        m = transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    else:
        m = transformers.AutoModelForCausalLM.from_pretrained(str(model.parent), gguf_file=model.name,
                                                              dtype=torch.float32).eval()
    load = time.perf_counter() - t0
    x = torch.tensor([ids])
    prefill, decode = [], []
    with torch.no_grad():
        for i in range(trials + 1):
            t = time.perf_counter()
            m(x)
            t_prefill = time.perf_counter() - t
            t = time.perf_counter()
            m.generate(x, max_new_tokens=gen, min_new_tokens=gen, do_sample=False)
            t_gen = time.perf_counter() - t
            if i:
                prefill.append(len(ids) / t_prefill)
                decode.append((gen - 1) / max(t_gen - t_prefill, 1e-9))
    return Result("transformers", load, statistics.median(prefill), statistics.median(decode), _peak_rss_mb(),
                  "fp32" if model.is_dir() else "fp32 (dequantized)")


def _llama_cpp(model: Path, ids: list[int], gen: int, trials: int) -> Result:
    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(str(model), n_ctx=len(ids) + gen + 8, n_threads=int(os.environ["EMBER_BENCH_THREADS"]),
                          n_batch=512, verbose=False)
    load = time.perf_counter() - t0
    prefill, decode = [], []
    for i in range(trials + 1):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        p = len(ids) / (time.perf_counter() - t)
        llm.reset()
        stamps = []
        for _ in llm.generate(ids, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == gen:
                break
        if i:
            prefill.append(p)
            decode.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return Result("llama.cpp", load, statistics.median(prefill), statistics.median(decode), _peak_rss_mb(),
                  f"llama-cpp-python {llama_cpp.__version__}")


@dataclass
class ServingResult:
    concurrency: int
    aggregate_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float  # the worst gaps: a stream waiting behind other requests' prefill
    peak_rss_mb: float
    engine: str = "ember"


def _percentile(xs: list[float], q: float) -> float:
    if not xs:  # e.g. no inter-token gaps when each request generates one token
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def serving_prompts(ids: list[int], n: int) -> list[list[int]]:
    """n distinct prompts for the serving benchmark: rotations of `ids`, so no two share a prefix."""
    return [ids[i % len(ids):] + ids[: i % len(ids)] for i in range(n)]


def serving_result(stamps: list[list[float]], t0: float, wall: float, rss_mb: float,
                   engine: str = "ember") -> ServingResult:
    """From each request's token arrival times (all requests sent at t0; the run took `wall` seconds)."""
    ttft = [(ts[0] - t0) * 1e3 for ts in stamps]
    gaps = [(b - a) * 1e3 for ts in stamps for a, b in zip(ts, ts[1:], strict=False)]
    return ServingResult(len(stamps), sum(map(len, stamps)) / wall, _percentile(ttft, 50), _percentile(ttft, 99),
                         _percentile(gaps, 50), _percentile(gaps, 99), rss_mb, engine)


def _ember_serving(model: Path, ids: list[int], gen: int, concurrency: int) -> ServingResult:
    """`concurrency` requests arrive at once (distinct prompts: no prefix to share), each generates `gen`."""
    import ember
    from ember import SamplingParams

    llm = ember.load(model)
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True)
    llm.generate([ids[1:] + ids[:1]] * 2, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    eng.kv.pool.reset_prefix_cache()
    t0 = time.perf_counter()
    stamps: dict[str, list[float]] = {eng.add_request(p, params): [] for p in serving_prompts(ids, concurrency)}
    while eng.has_unfinished():
        for out in eng.step():
            if out.token_ids:
                stamps[out.request_id].append(time.perf_counter())
    return serving_result(list(stamps.values()), t0, time.perf_counter() - t0, _peak_rss_mb())


WORKERS = {"ember": _ember, "transformers": _transformers, "llama.cpp": _llama_cpp}


def worker_main(argv: list[str]) -> None:
    engine, model, ids_json, gen, trials = argv
    threads = int(os.environ["EMBER_BENCH_THREADS"])
    import torch

    torch.set_num_threads(threads)
    if engine == "ember-serving":
        res: Result | ServingResult = _ember_serving(Path(model), json.loads(ids_json), int(gen), int(trials))
    else:
        res = WORKERS[engine](Path(model), json.loads(ids_json), int(gen), int(trials))
    print("EMBER_BENCH_RESULT " + json.dumps(asdict(res)))


# ---- driver -----------------------------------------------------------------------------------------
def available(engine: str) -> bool:
    import importlib.util

    module = {"ember": "ember", "transformers": "transformers", "llama.cpp": "llama_cpp"}[engine]
    return importlib.util.find_spec(module) is not None


def run_engine(engine: str, model: Path, ids: list[int], gen: int, trials: int, threads: int,
               quantize: str | None = None) -> Result:
    """quantize: ember's on-load quantization (nf4, fp4, int8); peers always run the file as stored.
    engine "ember-serving": the concurrency benchmark, `trials` being the number of concurrent requests."""
    env = dict(os.environ, EMBER_BENCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               EMBER_BENCH_QUANTIZE=quantize or "")
    cmd = [sys.executable, "-m", "ember.bench", engine, str(model), json.dumps(ids), str(gen), str(trials)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("EMBER_BENCH_RESULT "):
            fields = json.loads(line.split(" ", 1)[1])
            return ServingResult(**fields) if engine == "ember-serving" else Result(**fields)  # type: ignore[return-value]
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
    raise RuntimeError(f"{engine} benchmark failed:\n{tail}")


def read_bandwidth(threads: int, gib: int = 1) -> float:
    """This machine's memory read bandwidth in GB/s: the best of 5 reductions over `gib` GiB (far larger than
    any cache), on `threads` threads, as a decode step streams its weights."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(gib << 28, dtype=torch.int32)  # [gib GiB / 4 bytes]
        x.max()  # touch every page first
        best = math.inf
        for _ in range(5):
            t0 = time.perf_counter()
            x.max()
            best = min(best, time.perf_counter() - t0)
        return x.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(before)


def bandwidth_line(results: list[Result], weight_bytes: int, read_gbs: float) -> str:
    """The decode figure against what the machine can read: how close each engine is to memory-bound."""
    parts = [f"{r.engine} {r.decode_tok_s * weight_bytes / 1e9 / read_gbs:.0%}" for r in results]
    return f"[bench] machine read bandwidth {read_gbs:.1f} GB/s; decode weights GB/s as a share of it: " + \
        ", ".join(parts)


def table(results: list[Result], weight_bytes: int) -> str:
    base = results[0]
    rows = ["| engine | load s | prefill tok/s | decode tok/s | weights GB/s | peak RSS MB | decode vs ember | note |",
            "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        gbs = r.decode_tok_s * weight_bytes / 1e9
        load = "n/a" if math.isnan(r.load_s) else f"{r.load_s:.2f}"
        rows.append(f"| {r.engine} | {load} | {r.prefill_tok_s:.0f} | {r.decode_tok_s:.1f} | {gbs:.1f} | "
                    f"{r.peak_rss_mb:.0f} | {r.decode_tok_s / base.decode_tok_s:.2f}x | {r.note} |")
    return "\n".join(rows)


def serving_table(results: list[ServingResult]) -> str:
    rows = ["| engine | concurrency | aggregate tok/s | TTFT p50 ms | TTFT p99 ms | inter-token p50 ms "
            "| inter-token p99 ms | peak RSS MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rows.append(f"| {r.engine} | {r.concurrency} | {r.aggregate_tok_s:.0f} | {r.ttft_p50_ms:.0f} | "
                    f"{r.ttft_p99_ms:.0f} | {r.itl_p50_ms:.1f} | {r.itl_p99_ms:.1f} | {r.peak_rss_mb:.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    worker_main(sys.argv[1:])
