"""Random-weight GGUF models of real shapes, for speed measurements at the sizes people run (speed does not
depend on the weight values). Each is written as F16 (streamed: one tensor in memory at a time), then
quantized with llama.cpp's own `llama-quantize`, the same build as the `ember bench --vs llama.cpp` peers.

    python benchmarks/synthetic.py llama-3.2-1b [--out DIR] [--kinds Q4_0 Q4_K_M Q8_0] [--quantize BIN]

The vocabulary and chat template are SmolLM2-135M-Instruct's (a real byte-level BPE tokenizer), padded with
unused tokens to the shape's vocabulary size, so prompts tokenize as in real use and the output head has
its real size. Shapes: llama-3.2-1b, llama-3.2-3b, llama-3.1-8b, qwen2.5-7b (q/k/v biases).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

KINDS = ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")


@dataclass(frozen=True)
class Shape:
    arch: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    rope_base: float
    tied: bool
    qkv_bias: bool = False


SHAPES = {
    "llama-3.2-1b": Shape("llama", 2048, 16, 32, 8, 8192, 128256, 500000.0, tied=True),
    "llama-3.2-3b": Shape("llama", 3072, 28, 24, 8, 8192, 128256, 500000.0, tied=True),
    "llama-3.1-8b": Shape("llama", 4096, 32, 32, 8, 14336, 128256, 500000.0, tied=False),
    "qwen2.5-7b": Shape("qwen2", 3584, 28, 28, 4, 18944, 152064, 1000000.0, tied=False, qkv_bias=True),
}


def tensors(s: Shape) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, numpy shape [rows, cols], kind: "w" matrix / "n" norm / "b" bias) in llama.cpp's names."""
    dh = s.hidden // s.heads
    out = [("token_embd.weight", (s.vocab, s.hidden), "w"), ("output_norm.weight", (s.hidden,), "n")]
    if not s.tied:
        out.append(("output.weight", (s.vocab, s.hidden), "w"))
    for i in range(s.layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (s.hidden,), "n"), (b + "ffn_norm.weight", (s.hidden,), "n"),
                (b + "attn_q.weight", (s.heads * dh, s.hidden), "w"),
                (b + "attn_k.weight", (s.kv_heads * dh, s.hidden), "w"),
                (b + "attn_v.weight", (s.kv_heads * dh, s.hidden), "w"),
                (b + "attn_output.weight", (s.hidden, s.heads * dh), "w"),
                (b + "ffn_gate.weight", (s.ffn, s.hidden), "w"), (b + "ffn_up.weight", (s.ffn, s.hidden), "w"),
                (b + "ffn_down.weight", (s.hidden, s.ffn), "w")]
        if s.qkv_bias:
            out += [(b + f"attn_{x}.bias", (n * dh,), "b") for x, n in (("q", s.heads), ("k", s.kv_heads),
                                                                        ("v", s.kv_heads))]
    return out


def _vocab(w: GGUFWriter, s: Shape) -> None:
    """SmolLM2's tokenizer and chat template, padded with unused tokens to the shape's vocabulary."""
    from ember.hub import resolve_model
    from ember.weights.gguf_header import read_gguf_metadata

    md = read_gguf_metadata(resolve_model("smollm2-135m"))
    tokens = list(md["tokenizer.ggml.tokens"])
    types = list(md["tokenizer.ggml.token_type"])
    pad = s.vocab - len(tokens)
    w.add_tokenizer_model(md["tokenizer.ggml.model"])
    w.add_tokenizer_pre(md.get("tokenizer.ggml.pre", "default"))
    w.add_token_list(tokens + [f"<unused_{i}>" for i in range(pad)])
    w.add_token_types(types + [4] * pad)  # user-defined: never produced by the BPE merges
    w.add_token_merges(list(md["tokenizer.ggml.merges"]))
    for key, fn in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                    ("padding_token_id", w.add_pad_token_id)):
        if f"tokenizer.ggml.{key}" in md:
            fn(int(md[f"tokenizer.ggml.{key}"]))
    w.add_add_bos_token(bool(md.get("tokenizer.ggml.add_bos_token", False)))
    w.add_chat_template(md["tokenizer.chat_template"])


def write_f16(name: str, path: Path, seed: int = 0) -> Path:
    s = SHAPES[name]
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), s.arch)
    w.add_name(f"random {name}")
    w.add_block_count(s.layers)
    w.add_context_length(8192)
    w.add_embedding_length(s.hidden)
    w.add_feed_forward_length(s.ffn)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_rope_dimension_count(s.hidden // s.heads)
    w.add_rope_freq_base(s.rope_base)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(s.vocab)
    w.add_file_type(1)  # mostly F16
    _vocab(w, s)
    specs = tensors(s)
    for tname, shape, kind in specs:
        dtype = np.float32 if kind in "nb" else np.float16
        w.add_tensor_info(tname, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize,
                          raw_dtype=GGMLQuantizationType.F32 if kind in "nb" else GGMLQuantizationType.F16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (_, shape, kind) in enumerate(specs):
        if kind == "n":
            arr = (1.0 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
        elif kind == "b":
            arr = (0.02 * rng.standard_normal(shape)).astype(np.float32)
        else:  # small weights keep activations finite through every layer
            arr = (rng.standard_normal(shape, dtype=np.float32) * (0.5 / np.sqrt(shape[1]))).astype(np.float16)
        w.write_tensor_data(arr)
        if (i + 1) % 16 == 0 or i + 1 == len(specs):
            print(f"[synthetic] {path.name}: {i + 1}/{len(specs)} tensors", file=sys.stderr, flush=True)
    w.close()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("--out", type=Path, default=Path("synthetic"))
    ap.add_argument("--kinds", nargs="*", default=list(KINDS), help=f"llama-quantize types (default {KINDS})")
    ap.add_argument("--quantize", default="llama-quantize", help="path to llama.cpp's llama-quantize")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    f16 = a.out / f"{a.shape}-F16.gguf"
    if not f16.exists():
        write_f16(a.shape, f16)
    for kind in a.kinds:
        dst = a.out / f"{a.shape}-{kind}.gguf"
        if dst.exists():
            continue
        cmd = [a.quantize, str(f16), str(dst), kind, str(a.threads)]
        print("[synthetic] " + " ".join(cmd), file=sys.stderr)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"llama-quantize failed for {kind}:\n{r.stderr[-2000:]}")
        print(f"[synthetic] {dst}", file=sys.stderr)


if __name__ == "__main__":
    main()
