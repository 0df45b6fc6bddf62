"""The cost of the Ray Serve path: plain `ember serve` against `ember serve --replicas 1`, same model, same
CPUs, alternating (plain, ray, plain, ray, ...) so the machine's drift hits both alike.

    python benchmarks/scale_out.py --trials 3 -c 1 -c 16

Prints aggregate tok/s and TTFT p50 per server and concurrency (median over trials), and the ratios. The
load is benchmarks/http_load.py: each client streams --gen-len tokens after a distinct prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from http_load import run as load  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, ray: bool, cpus: int, extra: list[str], env: dict) -> tuple[subprocess.Popen, str]:
    port = _port()
    cmd = [sys.executable, "-m", "ember", "serve", "-m", model, "--port", str(port)]
    if ray:
        cmd += ["--replicas", "1", "--replica-cpus", str(cpus), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, **env})
    url = f"http://127.0.0.1:{port}"
    end = time.time() + 300
    while time.time() < end:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200 and (
                    not ray or "ember_replicas 1" in httpx.get(url + "/metrics", timeout=5).text):
                return proc, url + "/v1"
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
        time.sleep(0.5)
    raise RuntimeError("server not ready after 300 s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("-c", "--concurrency", type=int, action="append", default=None)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="the Ray replica's CPUs")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:ARGS",
                    help="one more run: `ember serve` flags and KEY=VALUE environment variables, e.g. "
                         "'ray-si4:--stream-interval 4' or 'plain:OMP_NUM_THREADS=1' (the name plain replaces it)")
    args = ap.parse_args()
    levels = args.concurrency or [1, 16]
    variants: dict[str, tuple[list[str], dict[str, str]]] = {"plain": ([], {}), "ray": ([], {})}
    for v in args.variant:
        name, _, words = v.partition(":")
        env = dict(w.split("=", 1) for w in words.split() if "=" in w and not w.startswith("-"))
        variants[name] = ([w for w in words.split() if w.split("=", 1)[0] not in env], env)
    got: dict[tuple[str, int], list[dict]] = {}
    for trial in range(args.trials):
        for kind, (flags, env) in variants.items():
            proc, url = start(args.model, kind != "plain", args.cpus, flags, env)
            try:
                for c in levels:
                    r = asyncio.run(load(url, Path(args.model).stem, c, args.gen_len))
                    got.setdefault((kind, c), []).append(r)
                    print(f"trial {trial} {kind:5} c={c:3}: {r['tok_s']:.0f} tok/s, TTFT p50 {r['ttft_p50']:.0f} ms",
                          file=sys.stderr, flush=True)
            finally:
                stop(proc)
    print("| server | clients | tok/s | vs plain | TTFT p50 ms | added ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for c in levels:
        tp = statistics.median(r["tok_s"] for r in got[("plain", c)])
        fp = statistics.median(r["ttft_p50"] for r in got[("plain", c)])
        for kind in variants:
            t = statistics.median(r["tok_s"] for r in got[(kind, c)])
            f = statistics.median(r["ttft_p50"] for r in got[(kind, c)])
            print(f"| {kind} | {c} | {t:.0f} | {t / tp:.2f} | {f:.0f} | {f - fp:+.0f} |")


if __name__ == "__main__":
    main()
