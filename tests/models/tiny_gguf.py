"""Write tiny random Llama-family GGUF files (in llama.cpp's conventions) for architecture tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, quants

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS, CTX = 320, 64, 4, 2, 16, 128, 2, 256


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (the byte-level BPE alphabet)."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation for the llama architecture (rotate-half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, arch: str = "llama", tied: bool = True, seed: int = 0,
                    template: str | None = None, odd_kind: GGMLQuantizationType | None = None) -> Path:
    """A 2-layer random model. `odd_kind` stores one weight in that encoding (random bytes), to test errors."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(CTX)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    # byte-level vocabulary: 256 byte tokens, a few merges, then specials
    alphabet = _bytes_to_unicode()
    merges = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
    merged = ["Ġt", "he", "Ġthe", "in", "an"]
    tokens = alphabet + merged + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += [f"<extra_{i}>" for i in range(VOCAB - len(tokens))]
    types = [1] * (256 + len(merged)) + [3, 3, 3] + [4] * (VOCAB - 256 - len(merged) - 3)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(256 + len(merged))
    w.add_eos_token_id(256 + len(merged) + 2)
    w.add_add_bos_token(False)
    if template is not None:
        w.add_chat_template(template)

    def t(shape: tuple[int, ...], scale: float = 0.08) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def add(name: str, arr: np.ndarray, kind: str = "F32") -> None:
        if kind == "Q8_0":
            w.add_tensor(name, quants.quantize(arr, GGMLQuantizationType.Q8_0),
                         raw_dtype=GGMLQuantizationType.Q8_0)
        elif kind == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, arr)

    add("token_embd.weight", t((VOCAB, HIDDEN), 0.5), "Q8_0")
    add("output_norm.weight", 1 + t((HIDDEN,)))
    if not tied:
        add("output.weight", t((VOCAB, HIDDEN)), "F16")
    for i in range(LAYERS):
        q, k = t((HEADS * HEAD_DIM, HIDDEN)), t((KV_HEADS * HEAD_DIM, HIDDEN))
        if arch == "llama":
            q, k = _permute(q, HEADS), _permute(k, KV_HEADS)
        add(f"blk.{i}.attn_norm.weight", 1 + t((HIDDEN,)))
        add(f"blk.{i}.ffn_norm.weight", 1 + t((HIDDEN,)))
        add(f"blk.{i}.attn_q.weight", q, "Q8_0")
        add(f"blk.{i}.attn_k.weight", k)
        add(f"blk.{i}.attn_v.weight", t((KV_HEADS * HEAD_DIM, HIDDEN)), "F16")
        add(f"blk.{i}.attn_output.weight", t((HIDDEN, HEADS * HEAD_DIM)))
        if arch == "qwen2":
            add(f"blk.{i}.attn_q.bias", t((HEADS * HEAD_DIM,), 0.5))
            add(f"blk.{i}.attn_k.bias", t((KV_HEADS * HEAD_DIM,), 0.5))
            add(f"blk.{i}.attn_v.bias", t((KV_HEADS * HEAD_DIM,), 0.5))
        add(f"blk.{i}.ffn_gate.weight", t((INTER, HIDDEN)), "Q8_0")
        add(f"blk.{i}.ffn_up.weight", t((INTER, HIDDEN)))
        if odd_kind is not None and i == 0:
            from gguf import GGML_QUANT_SIZES

            block, size = GGML_QUANT_SIZES[odd_kind]
            raw = rng.integers(0, 255, (HIDDEN, INTER // block * size), dtype=np.uint8)
            w.add_tensor(f"blk.{i}.ffn_down.weight", raw, raw_dtype=odd_kind)
        else:
            add(f"blk.{i}.ffn_down.weight", t((HIDDEN, INTER)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
