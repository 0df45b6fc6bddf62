"""gpu_check.py's end-to-end phases on one random-weight model: ember (bf16, and GPTQ int4 on the 8B shape),
transformers on the same weights, and ember's greedy tokens on the GPU against its CPU fp32 path."""

from __future__ import annotations

import gc
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

import ember
from benchmarks.gpu_models import make_bf16, make_gptq
from ember import SamplingParams

DECODE_TOKENS = 256  # batch-1 decode run
FIXED_OUT = 256  # the batched comparison against transformers: every request generates this many


def _ids(n: int, rng: random.Random, vocab: int = 300) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


class E2E:
    def __init__(self, name: str, work: Path, device: torch.device, smoke: bool) -> None:
        self.name, self.device, self.smoke = name, device, smoke
        self.dir = work / name
        self.llm: ember.LLM | None = None
        self.lo, self.hi = (8, 40) if smoke else (100, 1024)  # request lengths, in and out (nano-vllm's)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def _load(self, path: Path) -> tuple[ember.LLM, float]:
        t = time.perf_counter()
        extra = {"dtype": "float32", "attention": "triton"} if self.smoke else {}
        llm = ember.load(str(path), device=self.device.type, max_num_seqs=256, max_num_batched_tokens=8192,
                         max_model_len=4096, **extra)
        if self.smoke:  # the graph runner's path with the eager stand-in (CUDA graphs need a GPU)
            from ember.engine.graph_runner import DecodeGraphs, EagerGraph

            e = llm.engine
            e.runner.graphs = DecodeGraphs(e.model, e.kv, self.device, 8, e.max_model_len, make_graph=EagerGraph)
        return llm, time.perf_counter() - t

    def _decode_rate(self, llm: ember.LLM, n: int) -> dict:
        """Batch-1 decode: generate 1 then n+1 tokens after the same prompt; the difference is n decode steps."""
        prompt = _ids(32, random.Random(0))
        p1 = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        pn = SamplingParams(temperature=0, max_tokens=n + 1, ignore_eos=True)
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm-up, captures
        return self._decode_time(lambda: llm.generate([prompt], p1), lambda: llm.generate([prompt], pn), n)

    def _decode_time(self, one: Callable[[], object], more: Callable[[], object], n: int) -> dict:
        """Best of 2: the time of `more` (n + 1 tokens) minus that of `one` (1 token) is n decode steps."""
        best = float("inf")
        for _ in range(2):
            self.sync()
            t0 = time.perf_counter()
            one()
            t1 = time.perf_counter()
            more()
            self.sync()
            best = min(best, (time.perf_counter() - t1) - (t1 - t0))
        return {"tok_s": n / best, "ms_per_token": 1e3 * best / n}

    def _aggregate(self, llm: ember.LLM, c: int, fixed_out: int | None = None) -> dict:
        rng = random.Random(c)
        prompts = [_ids(rng.randint(self.lo, self.hi), rng) for _ in range(c)]
        outs = [fixed_out or rng.randint(self.lo, self.hi) for _ in range(c)]
        params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in outs]
        self.sync()
        t = time.perf_counter()
        res = llm.generate(prompts, params)
        self.sync()
        sec = time.perf_counter() - t
        made = sum(len(r.token_ids) for r in res)
        return {"requests": c, "out_tokens": made, "in_tokens": sum(map(len, prompts)), "seconds": sec,
                "tok_s": made / sec}

    def ember(self) -> dict:
        make_bf16(self.name, self.dir, self.device.type)
        llm, load_s = self._load(self.dir)
        self.llm = llm
        runner = llm.engine.runner
        out: dict = {"load_s": load_s, "attention": "triton" if runner.triton else "torch",
                     "kv_tokens": llm.engine.kv.capacity_tokens}
        n = 16 if self.smoke else DECODE_TOKENS
        out["batch1"] = self._decode_rate(llm, n)
        out["graph_buckets"] = sorted(runner.graphs.graphs) if runner.graphs is not None else []
        cs = (4,) if self.smoke else ((64,) if self.name == "llama-3.1-8b" else (64, 256))
        out["aggregate"] = [self._aggregate(llm, c) for c in cs]
        out["fixed_out_64"] = self._aggregate(llm, 4 if self.smoke else 64, 8 if self.smoke else FIXED_OUT)
        if self.name == "llama-3.1-8b" and not self.smoke:  # the same shape with 4-bit weights (GPTQ, group 128)
            self.release()
            q, q_load = self._load(make_gptq(self.dir, self.dir.with_name(self.name + "-gptq"), self.device.type))
            method = q.engine.model.layers[0].mlp.gate_up_proj.method.name
            out["gptq_int4"] = {"load_s": q_load, "method": method, "batch1": self._decode_rate(q, n)}
            del q
        return out

    def transformers(self) -> dict:
        """The peers on the same weights: static cache + torch.compile at batch 1 (transformers compiles the
        decode step itself for a static cache); its batched generate over 64 left-padded requests."""
        import transformers

        self.release()
        dt = torch.float32 if self.smoke else torch.bfloat16
        model = transformers.AutoModelForCausalLM.from_pretrained(self.dir, dtype=dt).to(self.device).eval()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        out: dict = {}
        prompt = torch.tensor([_ids(32, random.Random(0))], device=self.device)
        n = 16 if self.smoke else DECODE_TOKENS
        static = {} if self.smoke else {"cache_implementation": "static"}

        def gen(ids: torch.Tensor, k: int, **kw) -> torch.Tensor:
            with torch.inference_mode():
                return model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, **kw)

        t = time.perf_counter()
        gen(prompt, n + 1, **static)  # compiles
        gen(prompt, n + 1, **static)
        out["warmup_s"] = time.perf_counter() - t
        out["batch1_static_compile"] = self._decode_time(lambda: gen(prompt, 1, **static),
                                                         lambda: gen(prompt, n + 1, **static), n)
        c, k = (4, 8) if self.smoke else (64, FIXED_OUT)
        rng = random.Random(c)
        prompts = [_ids(rng.randint(self.lo, self.hi), rng) for _ in range(c)]
        width = max(map(len, prompts))
        ids = torch.zeros(c, width, dtype=torch.long)
        mask = torch.zeros(c, width, dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        self.sync()
        t = time.perf_counter()
        gen(ids.to(self.device), k, attention_mask=mask.to(self.device))
        self.sync()
        sec = time.perf_counter() - t
        out["batched_64"] = {"requests": c, "out_tokens": c * k, "seconds": sec, "tok_s": c * k / sec}
        return out  # the model is freed with this frame (release() collects it)

    def greedy_vs_cpu(self) -> dict:
        """ember on the GPU (bf16, Triton) against ember on the CPU in fp32: first divergence and its margin."""
        if self.llm is None:
            self.llm, _ = self._load(self.dir)
        prompt = _ids(24, random.Random(1))
        n = 8 if self.smoke else 32
        p = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=2)
        gpu = self.llm.generate([prompt], p)[0]
        cpu_llm = ember.load(str(self.dir), device="cpu", dtype="float32", attention="torch")
        cpu = cpu_llm.generate([prompt], p)[0]
        first = next((i for i, (a, b) in enumerate(zip(gpu.token_ids, cpu.token_ids, strict=True)) if a != b), None)
        margin = None
        if first is not None:  # how close the CPU reference's top two were where the GPU chose differently
            top = cpu.logprobs[first].top
            margin = top[0][1] - top[1][1] if len(top) > 1 else None
        return {"tokens": n, "equal": first is None, "first_divergence": first, "cpu_top2_margin": margin,
                "gpu": gpu.token_ids, "cpu": cpu.token_ids}

    def release(self) -> None:
        self.llm = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
