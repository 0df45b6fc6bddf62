"""Random-weight Hugging Face model directories of real shapes, made where they run (the GPU machine can
download nothing): bf16 safetensors written by transformers itself, and a GPTQ 4-bit copy (random codes,
group 128, symmetric) for the int4 path. Speed does not depend on the weight values.

The tokenizer is the tests' tiny byte-level BPE (320 tokens): the benchmarks feed token ids, and the model's
embedding and head keep their real vocabulary size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SHAPES: dict[str, tuple[str, dict]] = {
    "qwen3-0.6b": ("Qwen3Config", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                      num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                      vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                                      max_position_embeddings=40960, rms_norm_eps=1e-6)),
    "llama-3.2-1b": ("LlamaConfig", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                        tie_word_embeddings=True, rope_theta=500000.0,
                                        max_position_embeddings=131072, rms_norm_eps=1e-5)),
    "llama-3.1-8b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                        tie_word_embeddings=False, rope_theta=500000.0,
                                        max_position_embeddings=131072, rms_norm_eps=1e-5)),
    # the CPU smoke run of gpu_check.py
    "tiny": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=320, tie_word_embeddings=True,
                                max_position_embeddings=4096, rms_norm_eps=1e-5)),
}
GPTQ_GROUP = 128
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tokenizer(out: Path) -> None:
    from ember.tokenizer import Tokenizer
    from ember.weights.gguf_header import read_gguf_metadata
    from tests.models.tiny_gguf import write_tiny_gguf

    gguf = write_tiny_gguf(out / "tok.gguf")
    Tokenizer.from_gguf_metadata(read_gguf_metadata(gguf)).backend.save(str(out / "tokenizer.json"))
    gguf.unlink()
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "add_bos_token": False}))


def make_bf16(name: str, out: Path, device: str = "cuda") -> Path:
    """transformers' own random init of the shape (on `device`: seconds for an 8B), saved as safetensors."""
    import transformers

    if (out / "config.json").is_file():
        return out
    cls, kw = SHAPES[name]
    cfg = getattr(transformers, cls)(**kw)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    del model
    _tokenizer(out)
    return out


def _pack_rows(q: torch.Tensor) -> torch.Tensor:
    """4-bit codes [K, N] -> GPTQ qweight int32 [K/8, N] (nibble i of word r <- row 8r + i)."""
    q = q.to(torch.int64).view(q.shape[0] // 8, 8, -1)  # [K/8, 8, N]
    word = (q << (4 * torch.arange(8, device=q.device))[None, :, None]).sum(1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def make_gptq(src: Path, out: Path, device: str = "cuda", group: int = GPTQ_GROUP) -> Path:
    """A GPTQ 4-bit (v1, sym, `group`) directory with the bf16 model's non-linear tensors and random codes."""
    from safetensors.torch import load_file, save_file

    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False,
                                  "sym": True, "checkpoint_format": "gptq"}
    (out / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator(device=device).manual_seed(0)
    weight_map: dict[str, str] = {}
    for i, f in enumerate(sorted(src.glob("*.safetensors"))):
        tensors = load_file(f)
        kept: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            if key.endswith(".weight") and key.split(".")[-2] in LINEARS:
                n, k = t.shape
                prefix = key[: -len(".weight")]
                q = torch.randint(0, 16, (k, n), generator=g, device=device)
                kept[f"{prefix}.qweight"] = _pack_rows(q).cpu()
                # v1 stores zero - 1: 7 in every nibble is the symmetric zero 8
                kept[f"{prefix}.qzeros"] = torch.full((k // group, n // 8), 0x77777777, dtype=torch.int32)
                kept[f"{prefix}.scales"] = (torch.rand(k // group, n, generator=g, device=device) * 0.004
                                            ).half().cpu()
            else:
                kept[key] = t
        shard = f"model-{i:05d}.safetensors"
        save_file(kept, str(out / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(kept, shard))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((src / name).read_bytes())
    return out
