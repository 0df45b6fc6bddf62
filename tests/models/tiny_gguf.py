"""Write tiny random GGUF files (in llama.cpp's conventions) for architecture tests: Llama family, Gemma 3."""

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


def _add_vocab(w: GGUFWriter, template: str | None) -> None:
    """A byte-level BPE vocabulary: 256 byte tokens, a few merges, then specials."""
    w.add_vocab_size(VOCAB)
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


def _add(w: GGUFWriter, name: str, arr: np.ndarray, kind: str = "F32") -> None:
    """Store `arr` as F32, F16 or Q8_0 (quantized here with gguf-py, as llama.cpp's quantizer would)."""
    if kind == "Q8_0":
        w.add_tensor(name, quants.quantize(arr, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
    elif kind == "F16":
        w.add_tensor(name, arr.astype(np.float16))
    else:
        w.add_tensor(name, arr)


def _finish(w: GGUFWriter, path: Path) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tiny_gguf(path: Path, arch: str = "llama", tied: bool = True, seed: int = 0,
                    template: str | None = None, odd_kind: GGMLQuantizationType | None = None,
                    dense_kind: str = "F32") -> Path:
    """A 2-layer random model. `odd_kind` stores one weight in that encoding (random bytes), to test errors;
    `dense_kind` every weight matrix (F16: a half-precision checkpoint; else the mix of F32, F16 and Q8_0)."""
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
    _add_vocab(w, template)

    def t(shape: tuple[int, ...], scale: float = 0.08) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def add(name: str, arr: np.ndarray, kind: str = "F32") -> None:
        _add(w, name, arr, dense_kind if dense_kind != "F32" and arr.ndim == 2 else kind)

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
    return _finish(w, path)


# Gemma 3: 6 layers so that layer 5 is global (every 6th layer; the file can't say otherwise to
# transformers), a window of 4 tokens, and head_dim 256 (transformers assumes query_pre_attn_scalar 256).
G_LAYERS, G_HEAD_DIM, G_WINDOW = 6, 256, 4


def write_tiny_gemma3_gguf(path: Path, seed: int = 0, final_softcap: float | None = None) -> Path:
    """A random Gemma 3 in llama.cpp's conventions: norm weights stored as 1 + w, Q/K not permuted."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "gemma3")
    w.add_block_count(G_LAYERS)
    w.add_context_length(CTX)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(G_HEAD_DIM)
    w.add_value_length(G_HEAD_DIM)
    w.add_rope_freq_base(1e6)  # global layers; local layers use 10000
    w.add_sliding_window(G_WINDOW)
    w.add_layer_norm_rms_eps(1e-6)
    if final_softcap is not None:
        w.add_final_logit_softcapping(final_softcap)
    _add_vocab(w, None)

    def t(shape: tuple[int, ...], scale: float = 0.08) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    q, kv = HEADS * G_HEAD_DIM, KV_HEADS * G_HEAD_DIM
    _add(w, "token_embd.weight", t((VOCAB, HIDDEN), 0.1), "Q8_0")
    _add(w, "output_norm.weight", 1 + t((HIDDEN,), 0.3))
    for i in range(G_LAYERS):
        for norm in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            _add(w, f"blk.{i}.{norm}.weight", 1 + t((HIDDEN,), 0.3))
        _add(w, f"blk.{i}.attn_q_norm.weight", 1 + t((G_HEAD_DIM,), 0.3))
        _add(w, f"blk.{i}.attn_k_norm.weight", 1 + t((G_HEAD_DIM,), 0.3))
        _add(w, f"blk.{i}.attn_q.weight", t((q, HIDDEN)), "Q8_0")
        _add(w, f"blk.{i}.attn_k.weight", t((kv, HIDDEN)))
        _add(w, f"blk.{i}.attn_v.weight", t((kv, HIDDEN)), "F16")
        _add(w, f"blk.{i}.attn_output.weight", t((HIDDEN, q), 0.03))
        _add(w, f"blk.{i}.ffn_gate.weight", t((INTER, HIDDEN)), "Q8_0")
        _add(w, f"blk.{i}.ffn_up.weight", t((INTER, HIDDEN)))
        _add(w, f"blk.{i}.ffn_down.weight", t((HIDDEN, INTER)))
    return _finish(w, path)
