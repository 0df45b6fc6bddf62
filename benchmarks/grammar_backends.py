"""llguidance (ember's grammar backend) against xgrammar on one model's vocabulary: vocabulary set-up, schema
compile, first mask, and the per-token mask along a random walk through the grammar.

    python benchmarks/grammar_backends.py [-m smollm2-135m] [--steps 200]

xgrammar is measured only when it is installed (`pip install xgrammar`: it brings torch, transformers and
triton; llguidance brings nothing). Both walk the same schema with tokens drawn uniformly from each mask.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

import ember

SCHEMA = {"type": "object", "properties": {
    "location": {"type": "string", "description": "City and country"},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 14},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4}},
    "required": ["location", "unit", "days", "tags"], "additionalProperties": False}


def allowed_ids(mask: torch.Tensor, vocab: int) -> list[int]:
    bits = ((mask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).view(-1)[:vocab]
    return bits.nonzero().view(-1).tolist()


def walk(step, consume, done, mask: torch.Tensor, vocab: int, steps: int, seed: int = 0) -> list[float]:
    rng, times = random.Random(seed), []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
        ids = allowed_ids(mask, vocab)
        if not ids or done():
            break
        consume(rng.choice(ids))
    return times


def llguidance_row(llm: ember.LLM, steps: int) -> list[str]:
    import llguidance

    tok = llm.tokenizer
    t0 = time.perf_counter()
    lt = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size, eos_token=sorted(tok.eos_token_ids))
    setup = time.perf_counter() - t0
    compiles = []
    for _ in range(5):
        t0 = time.perf_counter()
        m = llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA))
        mask = torch.empty(1, (tok.vocab_size + 31) // 32, dtype=torch.int32)
        m.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
        compiles.append(time.perf_counter() - t0)
    times = walk(lambda: m.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4), m.consume_token,
                 m.is_stopped, mask, tok.vocab_size, steps)
    return ["llguidance", f"{setup:.2f}", f"{1e3 * statistics.median(compiles):.2f}",
            f"{1e3 * statistics.median(times):.3f}", f"{1e3 * max(times):.3f}"]


def xgrammar_row(llm: ember.LLM, steps: int) -> list[str] | None:
    try:
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    tok = llm.tokenizer
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tok.backend),
                                              vocab_size=tok.vocab_size, stop_token_ids=sorted(tok.eos_token_ids))
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    setup = time.perf_counter() - t0
    compiles = []
    for _ in range(5):
        t0 = time.perf_counter()
        m = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA)))
        mask = xgr.allocate_token_bitmask(1, info.vocab_size)
        m.fill_next_token_bitmask(mask)
        compiles.append(time.perf_counter() - t0)
    times = walk(lambda: m.fill_next_token_bitmask(mask), m.accept_token, m.is_terminated, mask, tok.vocab_size,
                 steps)
    return ["xgrammar", f"{setup:.2f}", f"{1e3 * statistics.median(compiles):.2f}",
            f"{1e3 * statistics.median(times):.3f}", f"{1e3 * max(times):.3f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    llm = ember.load(a.model)
    rows = [llguidance_row(llm, a.steps), xgrammar_row(llm, a.steps)]
    print("| backend | vocabulary set-up s | compile + first mask ms | mask per token ms (median) | max ms |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(r) + " |" if r else "| xgrammar | not installed | | | |")


if __name__ == "__main__":
    main()
