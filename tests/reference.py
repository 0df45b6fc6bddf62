"""Reference helpers shared by the model tests (transformers is the oracle)."""

from __future__ import annotations

import torch

# the quality check: these 5 prompts x 32 greedy tokens, on every shipped model
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
]
N_TOKENS = 32


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding with a fresh full forward per token: no cache, no EOS handling."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def reference_greedy_with_gaps(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and, per step, the reference's top-2 log-probability gap (small = near-tie)."""
    seq, gaps = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0, -1].float(), -1)
            top = logp.topk(2).values
            gaps.append(float(top[0] - top[1]))
            seq.append(int(logp.argmax()))
    return seq[len(ids):], gaps


def assert_same_until_near_tie(ours: list[int], ref: list[int], gaps: list[float], tie: float = 0.1) -> int:
    """Tokens must agree until the first step where the reference itself nearly ties; returns steps checked."""
    for i, (a, b) in enumerate(zip(ours, ref, strict=False)):
        if gaps[i] < tie:
            return i
        assert a == b, f"step {i}: ours {a} vs reference {b} (reference top-2 gap {gaps[i]:.3f})"
    return len(ref)


def load_reference(path, **config):
    """transformers' own model for a GGUF file, dequantized to fp32 (the oracle)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, **config).eval()


def generate_in_chunks(llm, ids: list[int], budget: int, params):
    """One generation with the engine's per-step token budget lowered, so the prompt is prefilled in chunks."""
    cfg = llm.engine.config
    cfg.max_num_batched_tokens, old = budget, cfg.max_num_batched_tokens
    try:
        return llm.generate([ids], params)[0]
    finally:
        cfg.max_num_batched_tokens = old


def assert_fused_step_equals_per_op(llm, prompts, max_tokens: int) -> None:
    """Generate with the one-call decode step, then with the per-op path (same prefill: the prefix cache is
    emptied in between): tokens and logprobs must agree bit for bit."""
    from ember import SamplingParams

    model = llm.engine.model
    assert model.decode_step is not None
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=1)
    fused = llm.generate(prompts, params)
    llm.engine.kv.pool.reset_prefix_cache()  # a cached prefix would attend in chunks (last bits differ)
    step, model.decode_step = model.decode_step, None
    try:
        per_op = llm.generate(prompts, params)
    finally:
        model.decode_step = step
    for a, b in zip(fused, per_op, strict=True):
        assert a.token_ids == b.token_ids
        assert [lp.logprob for lp in a.logprobs] == [lp.logprob for lp in b.logprobs]
