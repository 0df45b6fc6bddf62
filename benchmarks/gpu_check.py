"""The GPU check (issue 16): one script for a short lease on a GPU machine, writing $OUT/gpu_check.json after
every phase, so a run cut short still reports what it reached.

    python benchmarks/gpu_check.py [--budget 420] [--models llama-3.2-1b,qwen3-0.6b,llama-3.1-8b]
    python benchmarks/gpu_check.py --smoke     # on a CPU: tiny shapes, Triton in the interpreter

Phases, most valuable first: environment (versions, copy bandwidth) -> the kernels in bf16 against torch
references -> the test suite's GPU tests -> per model (random weights of a real shape, made there): ember's
batch-1 decode, aggregate tok/s at 64 and 256 requests (random 100-1024 tokens in and out), the same against
transformers (static cache + torch.compile at batch 1; its batched generate at 64 requests), greedy tokens
against ember's CPU fp32 path -> decode attention GB/s and int4 vs bf16 matmul. A phase that would start past
the budget is recorded as skipped; an exception is recorded and the next phase runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if "--smoke" in sys.argv:  # before anything imports a @triton.jit module
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from benchmarks import gpu_e2e, gpu_kernels  # noqa: E402


class Report:
    def __init__(self, out: Path, budget: float) -> None:
        self.path, self.deadline = out / "gpu_check.json", time.monotonic() + budget
        self.data: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "phases": {}}
        out.mkdir(parents=True, exist_ok=True)

    def phase(self, name: str, fn, *args, need: float = 0.0):
        """Run fn(*args) unless fewer than `need` seconds of the budget are left; record and save either way."""
        left = self.deadline - time.monotonic()
        if left < need:
            rec = {"skipped": f"{left:.0f} s of the budget left, the phase needs ~{need:.0f} s"}
            result = None
        else:
            t = time.monotonic()
            try:
                result = fn(*args)
                rec = {"ok": True, "result": result}
            except Exception:  # noqa: BLE001 - recorded, and the next phase runs
                result = None
                rec = {"ok": False, "error": traceback.format_exc()[-3000:]}
            rec["seconds"] = round(time.monotonic() - t, 1)
        self.data["phases"][name] = rec
        self.path.write_text(json.dumps(self.data, indent=1, default=str))
        print(f"[gpu_check] {name}: {json.dumps(rec, default=str)[:1500]}", flush=True)
        return result


def env(device: torch.device) -> dict:
    import transformers
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0], "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), int4_kernel=hasattr(torch.ops.aten,
                                                                                      "_weight_int4pack_mm"))
    info["copy_GBps"] = round(gpu_kernels.copy_bandwidth(device, 2.0 if device.type == "cuda" else 0.05), 1)
    return info


def tests(timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/gpu",
           "tests/unit/test_int4_gpu.py"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return {"rc": r.returncode, "tail": (r.stdout + r.stderr)[-2500:]}


def bench(device: torch.device, smoke: bool) -> dict:
    shapes = [(1, 64), (2, 300)] if smoke else [(1, 8192), (64, 1024), (64, 4096), (256, 1024), (256, 4096)]
    att = [gpu_kernels.attention_bandwidth(device, b, c, **({"h": 4, "hkv": 2, "dh": 16} if smoke else {}),
                                           dtype=torch.float32 if smoke else torch.bfloat16) for b, c in shapes]
    mm = gpu_kernels.int4_vs_bf16(device, *((256, 128, (1, 16)) if smoke else ()))
    return {"decode_attention": att, "matmul_4096x14336": mm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; later phases are skipped past it")
    ap.add_argument("--models", default="llama-3.2-1b,qwen3-0.6b,llama-3.1-8b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ember_gpu_models"), help="where models are written")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run: tiny model, Triton interpreter, fp32")
    a = ap.parse_args()
    device = torch.device("cpu" if a.smoke else "cuda")
    rep = Report(a.out, a.budget)
    rep.phase("env", env, device)
    dtype = torch.float32 if a.smoke else torch.bfloat16  # the interpreter's bf16 tl.dot is wrong upstream
    rep.phase("kernels", gpu_kernels.check_kernels, device, dtype)
    if not a.smoke:
        rep.phase("tests", tests, 150.0, need=60)
    models = ["tiny"] if a.smoke else a.models.split(",")
    for i, name in enumerate(models):
        e2e = gpu_e2e.E2E(name, a.work, device, a.smoke)
        big = name == "llama-3.1-8b"  # 16 GB made and saved, loaded, then a GPTQ copy made and loaded
        rep.phase(f"{name}/ember", e2e.ember, need=30 if a.smoke else (300 if big else 90))
        if i == 0:  # the peers on the first model (their compile alone takes a minute)
            rep.phase(f"{name}/transformers", e2e.transformers, need=30 if a.smoke else 120)
            rep.phase("bench", bench, device, a.smoke, need=20)
        if name != "llama-3.1-8b":
            rep.phase(f"{name}/greedy_vs_cpu", e2e.greedy_vs_cpu, need=20)
        e2e.release()
    print(f"[gpu_check] wrote {rep.path}", flush=True)


if __name__ == "__main__":
    main()
