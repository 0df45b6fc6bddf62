"""llama.cpp's own programs as `ember bench` peers, when they are installed (never required).

`ember bench --vs llama.cpp` with llama-bench on PATH (or $LLAMA_BENCH; preferred to llama-cpp-python):
llama-bench on the same file, prompt length, generation length, trials and threads (its prompt is its
own random tokens of that length; it reports no load time). $LLAMA_BENCH may name several builds, separated
by ':' (say one for this CPU and one for AVX2 only, the faster of which depends on the file): each is
measured, and ember is compared with the fastest for prefill and for decode.

`ember bench --concurrency N --vs llama.cpp`: llama-server is started on the same GGUF with N slots (`-np N`, each with room for the prompt and the
generation), the same thread count and a free loopback port; N streaming `/completion` requests with the
same prompt token ids (greedy, `ignore_eos`, no prompt cache) arrive at once. Its timings come from the
arrival of each streamed chunk, as ember's do from each step's outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from ember.bench import Result, ServingResult, serving_prompts, serving_result

HELP = ("llama.cpp's server was not found: build llama.cpp (cmake --build build -t llama-server) and put "
        "llama-server on PATH, or set LLAMA_SERVER=/path/to/llama-server")


def binary() -> str | None:
    """llama-server: $LLAMA_SERVER, else PATH (llama-bench, which may be several builds: bench_builds)."""
    return os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")


def bench_builds() -> list[tuple[str, str]]:
    """(label, path) of each llama-bench to measure: $LLAMA_BENCH (':'-separated), else the one on PATH.
    Several builds are told apart by their directory (`.../avx2/bin/llama-bench`: "llama.cpp avx2")."""
    paths = [p for p in os.environ.get("LLAMA_BENCH", "").split(os.pathsep) if p]
    if not paths:
        found = shutil.which("llama-bench")
        paths = [found] if found else []
    if len(paths) < 2:
        return [("llama.cpp", p) for p in paths]
    names = [next((d for d in reversed(Path(p).parent.parts) if d not in ("bin", "build", "Release")), p)
             for p in paths]
    if len(set(names)) < len(names):  # no telling them apart by directory: their paths
        names = paths
    return [(f"llama.cpp {n}", p) for n, p in zip(names, paths, strict=True)]


def best_peer_line(results: list[Result]) -> str | None:
    """With several llama.cpp builds: ember against the fastest of them, per measurement."""
    peers = [r for r in results if r.engine.startswith("llama.cpp")]
    if len(peers) < 2:
        return None
    ember, pp, tg = results[0], max(peers, key=lambda r: r.prefill_tok_s), max(peers, key=lambda r: r.decode_tok_s)
    return (f"[bench] ember against the fastest llama.cpp build: prefill {ember.prefill_tok_s / pp.prefill_tok_s:.2f}x "
            f"({pp.engine}), decode {ember.decode_tok_s / tg.decode_tok_s:.2f}x ({tg.engine})")


def _spawn(cmd: list[str], **kw) -> subprocess.Popen:
    try:
        return subprocess.Popen(cmd, **kw)
    except OSError as e:  # a wrong $LLAMA_SERVER / $LLAMA_BENCH: say which
        raise RuntimeError(f"cannot run {cmd[0]}: {e.strerror or e}") from None


def llama_bench(model: Path, prompt_len: int, gen: int, trials: int, threads: int, exe: str,
                label: str = "llama.cpp") -> Result:
    """Prefill (pp) and decode (tg) tok/s from llama-bench's JSON report; peak RSS of its process."""
    cmd = [exe, "-m", str(model), "-t", str(threads), "-p", str(prompt_len), "-n", str(gen), "-r", str(trials),
           "-o", "json"]
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        proc = _spawn(cmd, stdout=out_f, stderr=err_f, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here: its own peak RSS, not all children's
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    if code:
        raise RuntimeError(f"llama-bench exited with {code}:\n{err.strip()[-2000:]}")
    try:
        rows = json.loads(out)
        pp = next(r["avg_ts"] for r in rows if r["n_prompt"] == prompt_len and r["n_gen"] == 0)
        tg = next(r["avg_ts"] for r in rows if r["n_gen"] == gen and r["n_prompt"] == 0)
    except (ValueError, KeyError, StopIteration) as e:
        raise RuntimeError(f"llama-bench printed no pp{prompt_len} / tg{gen} rows ({e}):\n{out[-1000:]}") from None
    note = "llama-bench (its own random prompt tokens)" if label == "llama.cpp" else f"{exe} (its own random prompt tokens)"
    return Result(label, float("nan"), pp, tg, usage.ru_maxrss / 1024, note)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet, or 503 while the model loads
        time.sleep(0.2)
    raise RuntimeError(f"llama-server was not ready after {timeout:.0f} s:\n{log.read_text()[-2000:]}")


def _stream(url: str, prompt: list[int], gen: int, stamps: list[float], errors: list[str]) -> None:
    """One streaming completion; a timestamp per generated token."""
    body = json.dumps({"prompt": prompt, "n_predict": gen, "stream": True, "ignore_eos": True,
                       "cache_prompt": False, "temperature": 0}).encode()
    req = urllib.request.Request(f"{url}/completion", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                chunk = json.loads(line[6:])
                n = len(chunk.get("tokens") or []) or (1 if chunk.get("content") else 0)
                stamps.extend([time.perf_counter()] * n)
                if chunk.get("stop"):
                    break
    except (urllib.error.URLError, OSError, ValueError) as e:
        errors.append(str(e))


def _vm_hwm_mb(pid: int) -> float:
    try:
        for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
            if ln.startswith("VmHWM:"):
                return int(ln.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run(model: Path, ids: list[int], gen: int, concurrency: int, threads: int) -> ServingResult:
    exe = binary()
    if exe is None:
        raise RuntimeError(HELP)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    ctx = concurrency * (len(ids) + gen + 16)  # llama-server splits -c evenly between its slots
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "llama-server.log"
        with log.open("w") as out:
            proc = _spawn([exe, "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                           "-np", str(concurrency), "-c", str(ctx), "-t", str(threads)],
                          stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_ready(url, proc, log)
            stamps: list[list[float]] = [[] for _ in range(concurrency)]
            errors: list[str] = []
            workers = [threading.Thread(target=_stream, args=(url, p, gen, s, errors))
                       for p, s in zip(serving_prompts(ids, concurrency), stamps, strict=True)]
            t0 = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            wall = time.perf_counter() - t0
            if errors or any(not s for s in stamps):
                raise RuntimeError(f"llama-server requests failed: {errors[:3] or 'no tokens streamed'}")
            rss = _vm_hwm_mb(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return serving_result(stamps, t0, wall, rss, engine="llama.cpp server")
