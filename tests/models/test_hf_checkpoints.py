"""Hugging Face model directories (config.json + safetensors + tokenizer.json): tiny random models made by
transformers, ember's logits against transformers' (fp32) through prefill, decode and a batch of 2."""

from __future__ import annotations

import json

import pytest
import torch

import ember
from ember import SamplingParams
from ember.errors import ModelFormatError
from ember.tokenizer import Tokenizer
from ember.weights.gguf_header import read_gguf_metadata
from tests.models.tiny_gguf import write_tiny_gguf

transformers = pytest.importorskip("transformers")

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
CONFIGS = {
    "llama": (transformers.LlamaConfig, dict(rope_theta=10000.0, tie_word_embeddings=False)),
    "llama3-rope": (transformers.LlamaConfig, dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "mistral": (transformers.MistralConfig, dict(sliding_window=None, tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32, tie_word_embeddings=False)),
    "phi3": (transformers.Phi3Config, dict(original_max_position_embeddings=256, pad_token_id=0,
                                            tie_word_embeddings=False)),
    "bloom": (transformers.BloomConfig, dict(n_layer=2, n_head=4)),
    "gemma3": (transformers.Gemma3TextConfig, dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
               layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=30.0)),
}


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    """tokenizer.json / tokenizer_config.json of the tiny byte-level BPE vocabulary (320 tokens)."""
    d = tmp_path_factory.mktemp("tok")
    gguf = write_tiny_gguf(d / "t.gguf")
    tok = Tokenizer.from_gguf_metadata(read_gguf_metadata(gguf))
    tok.backend.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "chat_template": CHATML, "add_bos_token": False}))
    return d


def make_dir(kind: str, tmp_path, tokenizer_files, shards: bool = False):
    cls, extra = CONFIGS[kind]
    torch.manual_seed(0)
    common = dict(vocab_size=320, hidden_size=64) if kind == "bloom" else COMMON
    model = transformers.AutoModelForCausalLM.from_config(cls(**common, **extra)).eval()
    with torch.no_grad():  # random norm weights, so a norm loaded wrongly shows
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif "norm" in name or name.endswith("bias"):
                p.uniform_(-0.2, 0.2)
    out = tmp_path / kind
    model.save_pretrained(out, safe_serialization=True, max_shard_size="100KB" if shards else "2GB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((tokenizer_files / f).read_bytes())
    return model, out


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_logits_match_transformers(kind, tmp_path, tokenizer_files):
    ref, path = make_dir(kind, tmp_path, tokenizer_files, shards=kind == "llama")
    if kind == "llama":
        assert (path / "model.safetensors.index.json").is_file()  # sharded
    llm = ember.load(path, dtype="float32")
    assert llm.config.architecture == ("llama" if kind.startswith("llama") else kind)
    if kind == "gemma3":  # a prompt longer than the window, so the sliding layers' masks matter
        assert llm.config.extra["layer_types"] == ["sliding_attention", "full_attention"]
    prompts = [[5, 17, 200, 33, 90, 12], [3, 3, 8, 250, 1, 64, 100, 7, 19, 42, 11]]
    with torch.no_grad():  # prefill: every position
        want = ref(torch.tensor([prompts[1]])).logits[0]
    torch.testing.assert_close(llm.logits(prompts[1]), want, atol=1e-4, rtol=1e-4)
    # decode, two requests batched: logits of every sampled step against a full forward over the tokens
    seen: dict[str, list[torch.Tensor]] = {}
    eng, run = llm.engine, llm.engine.runner.run

    def recording(batch, *rest):
        logits = run(batch, *rest)
        rows = [s.request.request_id for s in batch.seqs if s.samples]
        for rid, row in zip(rows, logits, strict=True):
            seen.setdefault(rid, []).append(row.clone())
        return logits

    eng.runner.run = recording
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    finally:
        eng.runner.run = run
    for p, out in zip(prompts, outs, strict=True):
        full = p + out.token_ids
        with torch.no_grad():
            ref_logits = ref(torch.tensor([full])).logits[0, len(p) - 1 : -1]  # [6, V]
        torch.testing.assert_close(torch.stack(seen[out.request_id]), ref_logits, atol=1e-4, rtol=1e-4)


def test_tokenizer_template_and_generation_config(tmp_path, tokenizer_files):
    _, path = make_dir("qwen2", tmp_path, tokenizer_files)
    (path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [7, 9], "do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20,
         "max_new_tokens": 5, "max_length": 20}))
    llm = ember.load(path, dtype="float32")
    assert {7, 9} <= llm.tokenizer.eos_token_ids
    p = llm.default_params  # the model's defaults apply when no params are given, as in transformers
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.6, 0.9, 20, 5)
    assert len(llm.generate([[5, 6, 7, 8]])[0].token_ids) <= 5
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=8, ignore_eos=True))[0]  # explicit params win
    assert len(out.token_ids) == 8
    (path / "generation_config.json").write_text(json.dumps({"temperature": 0.6}))  # no do_sample: greedy
    assert ember.load(path, dtype="float32").default_params.temperature == 0.0
    ids = llm.encode_chat([{"role": "user", "content": "hi"}])
    assert llm.tokenizer.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_broken_directories_are_clear_errors(tmp_path, tokenizer_files):
    _, path = make_dir("llama", tmp_path, tokenizer_files, shards=True)
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelFormatError, match="missing"):
        ember.load(path)
    _, path = make_dir("qwen2", tmp_path, tokenizer_files)
    good = (path / "tokenizer_config.json").read_text()
    (path / "tokenizer_config.json").write_text("{ broken")
    with pytest.raises(ModelFormatError, match="tokenizer_config.json cannot be read"):
        ember.load(path)
    (path / "tokenizer_config.json").write_text(good)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["FancyNewForCausalLM"], "fancy_new"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning), pytest.raises(ModelFormatError, match="cannot load FancyNewForCausalLM"):
        ember.load(path)  # not native, and transformers does not know it either


def test_auto_dtype_follows_a_half_precision_checkpoint(tmp_path, tokenizer_files):
    from ember.config import cpu_has_fast_bf16

    ref, path = make_dir("llama", tmp_path, tokenizer_files)
    ref.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    llm = ember.load(path)
    assert llm.dtype == (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
    assert ember.load(path, dtype="float32").dtype == torch.float32
    with torch.no_grad():
        want = ref.float()(torch.tensor([[5, 17, 200, 33]])).logits[0]
    torch.testing.assert_close(llm.logits([5, 17, 200, 33]), want, atol=0.1, rtol=0.05)  # bf16 weights


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_gptq_and_awq_directories(fmt, tmp_path, tokenizer_files):
    """Every linear stored as a 4-bit GPTQ / AWQ checkpoint stores it (RTN, group 32); the reference is
    transformers with the exact dequantized weights."""
    from safetensors.torch import save_file

    from tests.unit.test_gptq_awq import AWQ_PACK, _pack, _rtn

    ref, path = make_dir("llama", tmp_path, tokenizer_files)
    state, out = ref.state_dict(), {}
    for name, w in state.items():
        if not name.endswith("_proj.weight"):
            out[name] = w.contiguous()
            continue
        g_idx = torch.arange(w.shape[1]) // 32
        q, z, s, w_ref = _rtn(w, g_idx, sym=False, zmin=1 if fmt == "gptq" else 0)
        state[name].copy_(w_ref)  # the reference model runs the exact dequantized weights
        p = name.removesuffix(".weight")
        if fmt == "gptq":
            out |= {f"{p}.qweight": _pack(q, 0, list(range(8))), f"{p}.qzeros": _pack(z - 1, 1, list(range(8))),
                    f"{p}.scales": s, f"{p}.g_idx": g_idx.to(torch.int32)}
        else:
            out |= {f"{p}.qweight": _pack(q, 1, AWQ_PACK), f"{p}.qzeros": _pack(z, 1, AWQ_PACK), f"{p}.scales": s}
    for f in path.glob("model*.safetensors*"):
        f.unlink()
    save_file(out, str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = ({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                                   "sym": False, "checkpoint_format": "gptq"} if fmt == "gptq" else
                                  {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm",
                                   "zero_point": True})
    (path / "config.json").write_text(json.dumps(cfg))
    llm = ember.load(path)
    assert llm.dtype == torch.bfloat16
    methods = {type(m.method).__name__ for m in llm.engine.model.modules() if hasattr(m, "method") and
               m is not llm.engine.model.lm_head}
    assert "GPTQMethod" in methods or not __import__("ember.quant.int4", fromlist=["x"]).kernel_available()
    ids = [5, 17, 200, 33, 90, 12]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(llm.logits(ids), want, atol=0.15, rtol=0.05)  # bf16 activations


def test_other_architectures_run_through_the_transformers_fallback(tmp_path, tokenizer_files):
    """GPT-2 has no native ember model: it runs as a transformers model behind the same engine, batched."""
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4,
                                                                n_positions=256)).eval()
    path = tmp_path / "gpt2"
    ref.save_pretrained(path, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (path / f).write_bytes((tokenizer_files / f).read_bytes())
    with pytest.warns(UserWarning, match="through transformers"):
        llm = ember.load(path)
    assert llm.config.architecture == "transformers:GPT2LMHeadModel"
    prompts = [[5, 17, 200, 33], [3, 3, 8, 250, 1, 64, 100]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for p, out in zip(prompts, outs, strict=True):
        want = ref.generate(torch.tensor([p]), max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, len(p):]
        assert out.token_ids == want.tolist()
    torch.testing.assert_close(llm.logits(prompts[1]), ref(torch.tensor([prompts[1]])).logits[0], atol=1e-4,
                               rtol=1e-4)
    assert not llm.engine.model.caches  # finished requests leave no transformers cache behind


def test_pickled_bin_weights_load_only_as_plain_tensors(tmp_path, tokenizer_files):
    ref, path = make_dir("llama", tmp_path, tokenizer_files)
    for f in path.glob("model*.safetensors*"):
        f.unlink()
    torch.save(ref.state_dict(), path / "pytorch_model.bin")
    with pytest.warns(UserWarning, match="weights_only"):
        llm = ember.load(path, dtype="float32")
    ids = [5, 17, 200, 33]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(llm.logits(ids), want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_cuda_logits_match_transformers(tmp_path, tokenizer_files):
    ref, path = make_dir("qwen2", tmp_path, tokenizer_files)
    llm = ember.load(path, device="cuda", dtype="float32")
    ids = [5, 17, 200, 33, 90, 12]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(llm.logits(ids).cpu(), want, atol=1e-3, rtol=1e-3)
    out = llm.generate([ids, ids[:3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [4, 4]
