"""GGUF reader: metadata -> ModelConfig + tokenizer + chat template; tensors memory-mapped, kept packed.

Tensor names are mapped to ember's (HF-style) module names here, so the model only sees one naming.
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ember.config import ModelConfig
from ember.errors import ModelFormatError
from ember.weights.base import RawTensor, float_to_f32
from ember.weights.gguf_header import TensorInfo, read_gguf_header

# Encodings ember reads. IQ*/TQ* and MXFP4 are not supported (yet).
SUPPORTED_KINDS = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
                   "Q5_K", "Q6_K")
FLOATS = {"F32": float_to_f32(torch.float32), "F16": float_to_f32(torch.float16), "BF16": float_to_f32(torch.bfloat16)}
# Architectures with a native model file; the message for others lists these.
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED_ARCHITECTURES = (*LLAMA_FAMILY, "gemma3")

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Per-architecture overrides: the same GGUF name can be a different norm (Gemma's sandwich norms:
# its `ffn_norm` is the pre-feedforward norm, `post_attention_norm` normalizes the attention output).
_ARCH_LAYER_NAMES: dict[str, dict[str, str]] = {
    "gemma3": {
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_GLOBAL_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")


def map_name(gguf_name: str, arch: str = "llama") -> str | None:
    """'blk.3.attn_q.weight' -> 'layers.3.self_attn.q_proj.weight'; None for names ember doesn't use."""
    m = _BLK.match(gguf_name)
    if m:
        layer, part, suffix = m.groups()
        names = _ARCH_LAYER_NAMES.get(arch, {})
        target = names.get(part, _LAYER_NAMES.get(part))
        return None if target is None else f"layers.{layer}.{target}.{suffix}"
    if gguf_name == "rope_freqs.weight":
        return "rope_freqs"  # a buffer of the model, not a module's weight
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    return None


def _unpermute(n_head: int, rows: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation (interleaved-pair rotary -> rotate-half)."""
    # llama.cpp stored row (h, i, j) of the HF weight at (h, j, i) with i in 2, j in head_dim/2.
    idx = np.arange(rows).reshape(n_head, rows // n_head // 2, 2)
    return idx.transpose(0, 2, 1).reshape(-1)


class GGUFFile:
    """An opened GGUF file: `metadata`, `config()`, `tensors()`. Errors are ModelFormatError."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise ModelFormatError(f"cannot read model file {self.path}: {e.strerror}") from None
        if magic != b"GGUF":
            raise ModelFormatError(
                f"{self.path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); ember reads .gguf files "
                "(and, later, Hugging Face model directories)"
            )
        try:
            self.metadata, self.infos = read_gguf_header(self.path)
        except ModelFormatError as e:
            raise ModelFormatError(
                f"{e} — the file is truncated or corrupt. Download it again (for an alias: `ember pull --force NAME`)."
            ) from None
        self.arch = str(self.metadata.get("general.architecture", "?"))
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._check_complete()

    @property
    def is_quantized(self) -> bool:
        """True when most of the weights are block-quantized (not F32/F16/BF16)."""
        quant = sum(int(np.prod(t.dims)) for t in self.infos if self._kind(t) not in ("F32", "F16", "BF16"))
        return quant * 2 > sum(int(np.prod(t.dims)) for t in self.infos)

    @property
    def half_dtype(self) -> torch.dtype | None:
        """float16 / bfloat16 when most weights are F16 / BF16 (the checkpoint's own dtype, as an HF directory's
        torch_dtype states it), else None."""
        sizes: dict[str, int] = {}
        for t in self.infos:
            sizes[self._kind(t)] = sizes.get(self._kind(t), 0) + int(np.prod(t.dims))
        kind = max(sizes, key=lambda k: sizes[k]) if sizes else None
        return {"F16": torch.float16, "BF16": torch.bfloat16}.get(kind or "")

    def _nbytes(self, t: TensorInfo) -> int:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(t.type_id)]
        return int(np.prod(t.dims)) // block * type_size

    def _kind(self, t: TensorInfo) -> str:
        try:
            return GGMLQuantizationType(t.type_id).name
        except ValueError:
            return f"type {t.type_id}"

    def _check_complete(self) -> None:
        size = self._data.size
        for t in self.infos:
            kind = self._kind(t)
            if kind not in SUPPORTED_KINDS:
                raise ModelFormatError(
                    f"{self.path}: tensor {t.name} uses {kind}, which ember does not read yet; supported: "
                    f"{', '.join(SUPPORTED_KINDS)}"
                )
            end = t.offset + self._nbytes(t)
            if end > size:
                raise ModelFormatError(
                    f"{self.path} is truncated: tensor {t.name} ends at byte {end:,} but the file has {size:,} "
                    "bytes. Download it again (for an alias: `ember pull --force NAME`)."
                )

    def _get(self, key: str, default: Any = None, required: bool = True) -> Any:
        full = f"{self.arch}.{key}"
        if full in self.metadata:
            return self.metadata[full]
        if required and default is None:
            raise ModelFormatError(f"{self.path}: metadata key {full!r} is missing; the file is incomplete")
        return default

    def config(self) -> ModelConfig:
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise ModelFormatError(
                f"{self.path}: architecture {self.arch!r} is not supported yet; ember runs these GGUF "
                f"architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        hidden = int(self._get("embedding_length"))
        heads = int(self._get("attention.head_count"))
        head_dim = int(self._get("attention.key_length", hidden // heads, required=False))
        names = {t.name for t in self.infos}
        vocab = self._get("vocab_size", None, required=False) or len(self.metadata["tokenizer.ggml.tokens"])
        scaling = None
        if self._get("rope.scaling.type", None, required=False) == "linear":
            scaling = {"type": "linear", "factor": float(self._get("rope.scaling.factor"))}
        elif "rope_freqs.weight" in names:
            scaling = {"type": "freq_factors"}  # Llama-3.1 style: per-frequency divisors stored as a tensor
        return ModelConfig(
            architecture=self.arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(self._get("feed_forward_length")),
            num_layers=int(self._get("block_count")),
            num_heads=heads,
            num_kv_heads=int(self._get("attention.head_count_kv", heads, required=False)),
            head_dim=head_dim,
            max_position_embeddings=int(self._get("context_length", 4096, required=False)),
            rms_norm_eps=float(self._get("attention.layer_norm_rms_epsilon", 1e-5, required=False)),
            rope_theta=float(self._get("rope.freq_base", 10000.0, required=False)),
            rope_dim=int(self._get("rope.dimension_count", head_dim, required=False)),
            rope_scaling=scaling,
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            extra=self._gemma3_extra(hidden, heads, head_dim) if self.arch == "gemma3" else {},
        )

    def _gemma3_extra(self, hidden: int, heads: int, head_dim: int) -> dict[str, Any]:
        """Gemma 3 values the GGUF leaves implicit (llama.cpp hard-codes them; transformers has defaults)."""
        layers = int(self._get("block_count"))
        window = int(self._get("attention.sliding_window", 0, required=False))
        # every 6th layer attends globally (transformers' layer_types default, llama.cpp's swa pattern 6);
        # no window in the file: every layer is global, as llama.cpp reads it
        pattern = self._get("attention.sliding_window_pattern", 6, required=False)
        if isinstance(pattern, list):  # one flag per layer (True: sliding), as gguf-py may write it
            if len(pattern) != layers:
                raise ModelFormatError(f"{self.path}: sliding_window_pattern has {len(pattern)} flags for "
                                       f"{layers} layers; the file is inconsistent")
            sliding = [bool(f) and window > 0 for f in pattern]
        else:
            sliding = [window > 0 and (i + 1) % int(pattern) != 0 for i in range(layers)]
        # the attention scale is query_pre_attn_scalar**-0.5; the file doesn't store it. It is head_dim for
        # every size but 27B (62 layers), whose HF config has hidden/heads: llama.cpp's rule (transformers'
        # GGUF loader always keeps its default 256, right for all sizes but 27B)
        scalar = hidden / heads if layers == 62 else head_dim
        softcaps = [self._get(k, None, required=False) for k in ("attn_logit_softcapping", "final_logit_softcapping")]
        attn_cap, final_cap = (float(c) if c else None for c in softcaps)  # absent or 0: off
        return {
            "sliding_window": window or None,
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
            "rope_local_base": 10000.0,  # local layers' rope base; the file's freq_base is the global one
            "query_pre_attn_scalar": float(scalar),
            "attn_logit_softcapping": attn_cap,
            "final_logit_softcapping": final_cap,
        }

    def raw_tensors(self) -> Iterator[RawTensor]:
        """Every tensor as stored, under its GGUF name (no renaming, no row reordering)."""
        from gguf import quants

        for t in self.infos:
            qtype = GGMLQuantizationType(t.type_id)
            shape = tuple(reversed(t.dims))  # torch order: [out, in]
            rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            nbytes = self._nbytes(t)
            data = self._data[t.offset : t.offset + nbytes].reshape(rows, -1)  # [rows, bytes per row]
            dequant = FLOATS[qtype.name] if qtype.name in FLOATS else partial(quants.dequantize, qtype=qtype)
            yield RawTensor(t.name, qtype.name, shape, data, dequant, partial(self._release, t.offset, nbytes))

    def _release(self, start: int, length: int) -> None:
        """Unmap a packed tensor's pages: a read-only file mapping's pages count as resident memory until
        then (SmolLM2 / Gemma: the whole file again on top of the packed copy at the end of loading)."""
        mm, advice = getattr(self._data, "_mmap", None), getattr(mmap, "MADV_DONTNEED", None)
        if mm is None or advice is None or length <= 0:
            return
        first = start // mmap.PAGESIZE * mmap.PAGESIZE  # a shared edge page just faults in again if used
        try:
            mm.madvise(advice, first, min(start + length, len(mm)) - first)
        except (OSError, ValueError):  # only memory is at stake: never fail a load over it
            pass

    def tensors(self) -> Iterator[tuple[str, RawTensor]]:
        """(ember name, RawTensor) for every tensor ember uses; Q/K rows restored to HF order."""
        cfg = self.config()
        for raw in self.raw_tensors():
            name = map_name(raw.name, self.arch)
            if name is None:
                continue
            # llama.cpp permutes Q/K rows only for the llama architecture (Qwen2 etc. keep HF order)
            if self.arch == "llama" and (".q_proj." in name or ".k_proj." in name):
                n = cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads
                raw = raw.permute_rows(_unpermute(n, raw.shape[0]))
            yield name, raw
