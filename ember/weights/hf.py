"""Hugging Face model directories: config.json -> ModelConfig, safetensors (single or sharded) -> RawTensors.

Tensors are memory-mapped by the safetensors library and handed to the loader one at a time, in their
stored dtype (F32 / F16 / BF16): nothing is converted before the quant method packs it. Pickled `.bin`
weights are never unpickled: they load only through `torch.load(weights_only=True)`, with a warning.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ember.config import ModelConfig
from ember.errors import ModelFormatError
from ember.weights.base import RawTensor, float_to_f32

# HF `architectures[0]` -> ember architecture with a native model file
NATIVE = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
          "Qwen3ForCausalLM": "qwen3", "Gemma3ForCausalLM": "gemma3", "Phi3ForCausalLM": "phi3",
          "BloomForCausalLM": "bloom"}
# Bloom's names -> ember's (the embedding and final norm are named as in every other model)
_BLOOM_NAMES = (("transformer.word_embeddings_layernorm.", "embed_norm."), ("transformer.word_embeddings.", "embed_tokens."),
                ("transformer.h.", "layers."), ("transformer.ln_f.", "norm."))
_KIND = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_QPARTS = ("qweight", "qzeros", "scales", "g_idx")  # a GPTQ / AWQ linear as stored


def read_json(path: Path, default: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON file of a model directory; `default` when it is optional and absent. A broken file is a
    ModelFormatError naming it (every JSON of a model directory is read through here)."""
    if default is not None and not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path} cannot be read: {e}") from None


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _plus_one(dequant):
    return lambda arr: dequant(arr) + np.float32(1.0)


class HFCheckpoint:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.hf = read_json(self.path / "config.json")
        archs = self.hf.get("architectures") or []
        self.hf_arch = archs[0] if archs else self.hf.get("model_type", "?")
        self.arch = NATIVE.get(self.hf_arch)  # None: not native, the transformers fallback may run it
        q = self.hf.get("quantization_config")
        self.quant: dict[str, Any] | None = dict(q) if q else None
        if q and str(q.get("quant_method", "")).lower() not in ("gptq", "awq"):
            raise ModelFormatError(f"{self.path}: {q.get('quant_method')!r} checkpoints are not read; ember reads "
                                   "GPTQ and AWQ (4-bit) directories, or quantizes full-precision ones on load "
                                   "(--quantize nf4 | fp4 | int8)")
        if q and self.arch in ("phi3", "bloom"):
            raise ModelFormatError(f"{self.path}: quantized {self.hf_arch} (fused qkv) is not read yet")
        self.files = self._weight_files()
        self._config: ModelConfig | None = None

    # ---- config -------------------------------------------------------------------------------------
    def config(self) -> ModelConfig:
        if self._config is None:
            self._config = self._make_config()
        return self._config

    def _make_config(self) -> ModelConfig:
        if self.arch == "bloom":
            return self._bloom_config()
        c = self.hf
        heads = int(c["num_attention_heads"])
        head_dim = int(c.get("head_dim") or c["hidden_size"] // heads)
        # transformers 5 writes `rope_parameters` (theta inside; Gemma 3: one per layer type); older configs
        # rope_theta + rope_scaling
        rope = dict(c.get("rope_parameters") or {})
        if "full_attention" in rope:
            rope = dict(rope["full_attention"])
        theta = c.get("rope_theta") or rope.get("rope_theta") or 10000.0
        scaling = dict(c.get("rope_scaling") or rope) or None
        if scaling is not None:
            scaling["type"] = scaling.get("rope_type") or scaling.get("type")
            if scaling["type"] not in ("linear", "llama3", "default", None):
                raise ModelFormatError(f"{self.path}: rope_scaling type {scaling['type']!r} is not supported yet")
            if scaling["type"] in ("default", None):
                scaling = None
        max_pos = int(c.get("max_position_embeddings", 4096))
        # Qwen2/3 write a window but switch it off (use_sliding_window: false); Gemma 3 implements its own
        window = c.get("sliding_window") if c.get("use_sliding_window", True) and self.arch != "gemma3" else None
        if window and window < max_pos:
            # ember's Llama-family model attends globally: within the window that is the same attention
            warnings.warn(f"{self.path.name}: sliding-window attention ({window} tokens) is not implemented for "
                          f"{self.hf_arch}; the context is limited to {window} tokens", stacklevel=3)
            max_pos = int(window)
        partial = float(rope.get("partial_rotary_factor") or c.get("partial_rotary_factor") or 1.0)
        return ModelConfig(
            architecture=self.arch,
            vocab_size=int(c["vocab_size"]),
            hidden_size=int(c["hidden_size"]),
            intermediate_size=int(c["intermediate_size"]),
            num_layers=int(c["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            max_position_embeddings=max_pos,
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_dim=int(head_dim * partial),
            rope_scaling=scaling,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", self.arch == "gemma3")),
            attention_bias=bool(c.get("attention_bias", self.arch == "qwen2")),
            extra=self._gemma3_extra() if self.arch == "gemma3" else {"qk_norm": self.arch == "qwen3"},
        )

    def _bloom_config(self) -> ModelConfig:
        c = self.hf
        d, heads = int(c.get("hidden_size") or c["n_embed"]), int(c.get("n_head") or c["num_attention_heads"])
        return ModelConfig(
            architecture="bloom", vocab_size=int(c["vocab_size"]), hidden_size=d, intermediate_size=4 * d,
            num_layers=int(c.get("n_layer") or c["num_hidden_layers"]), num_heads=heads, num_kv_heads=heads,
            head_dim=d // heads, max_position_embeddings=int(c.get("seq_length") or 2048),  # ALiBi: no table
            rms_norm_eps=float(c.get("layer_norm_epsilon", 1e-5)), tie_word_embeddings=True, attention_bias=True,
            extra={"apply_residual_connection_post_layernorm": bool(c.get("apply_residual_connection_post_layernorm"))},
        )

    def _gemma3_extra(self) -> dict[str, Any]:
        c = self.hf
        layers, window = int(c["num_hidden_layers"]), c.get("sliding_window")
        types = c.get("layer_types")
        if types is None:  # older configs: every n-th layer global
            n = int(c.get("sliding_window_pattern") or c.get("_sliding_window_pattern") or 6)
            types = ["full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(layers)]
        local = (c.get("rope_parameters") or {}).get("sliding_attention", {}).get("rope_theta")
        caps = [c.get(k) for k in ("attn_logit_softcapping", "final_logit_softcapping")]
        return {
            "sliding_window": window,
            "layer_types": list(types),
            "rope_local_base": float(local or c.get("rope_local_base_freq") or 10000.0),
            "query_pre_attn_scalar": float(c.get("query_pre_attn_scalar") or c["head_dim"]),
            "attn_logit_softcapping": float(caps[0]) if caps[0] else None,
            "final_logit_softcapping": float(caps[1]) if caps[1] else None,
        }

    @property
    def torch_dtype(self) -> torch.dtype | None:
        name = self.hf.get("torch_dtype") or self.hf.get("dtype")
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(name)

    # ---- tensors --------------------------------------------------------------------------------------
    def _weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(read_json(index).get("weight_map", {}).values()))
            missing = [s for s in shards if not (self.path / s).is_file()]
            if missing:
                raise ModelFormatError(f"{self.path}: shards {missing[:3]} named by the index are missing "
                                       f"(an interrupted download? fetch them again)")
            return [self.path / s for s in shards]
        single = self.path / "model.safetensors"
        if single.is_file():
            return [single]
        bins = sorted(self.path.glob("pytorch_model*.bin"))
        if bins:
            warnings.warn(f"{self.path.name}: pickled .bin weights, loaded with torch.load(weights_only=True); "
                          "safetensors load faster and safer", stacklevel=3)
            return bins
        raise ModelFormatError(f"{self.path}: no model.safetensors, sharded index or pytorch_model.bin found")

    def tensors(self) -> Iterator[tuple[str, RawTensor]]:
        """(ember name, RawTensor): HF names without their `model.` prefix; the head keeps its name. A GPTQ
        or AWQ linear's qweight / qzeros / scales / g_idx become one packed tensor named `<linear>.weight`."""
        from ember.quant.gptq import gptq_tensor_from

        expected = self._quant_parts() if self.quant else {}
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for f in self.files:
            for name, t in self._read(f):
                ember_name = name.removeprefix("model.")
                if "rotary_emb" in ember_name:
                    continue
                if self.arch == "bloom":
                    ember_name = next((ember_name.replace(a, b, 1) for a, b in _BLOOM_NAMES if ember_name.startswith(a)),
                                      ember_name)
                prefix, _, leaf = ember_name.rpartition(".")
                if prefix in expected and leaf in _QPARTS:
                    parts = pending.setdefault(prefix, {})
                    parts[f"{prefix}.{leaf}"] = t
                    if len(parts) == expected[prefix]:  # every part of this linear has been read
                        del pending[prefix]
                        yield f"{prefix}.weight", gptq_tensor_from(prefix, parts, self.quant)  # type: ignore[misc]
                    continue
                if self.arch == "phi3" and ember_name.endswith(("qkv_proj.weight", "gate_up_proj.weight")):
                    yield from self._split(ember_name, t)  # fused in the file: ember fuses its own shards
                    continue
                if t.dtype not in _KIND:
                    raise ModelFormatError(f"{f.name}: tensor {name} has dtype {t.dtype}, not f32/f16/bf16")
                arr = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
                dequant = float_to_f32(t.dtype)
                if self.arch == "gemma3" and ember_name.endswith("norm.weight"):
                    dequant = _plus_one(dequant)  # Gemma's RMSNorm scales by 1 + w; ember's by w (as GGUF stores)
                raw = RawTensor(ember_name, _KIND[t.dtype], tuple(t.shape), arr, dequant)
                if self.arch == "bloom" and ".query_key_value." in ember_name:
                    c = self.config()  # rows per head [q, k, v] -> [q heads; k heads; v heads]
                    perm = np.arange(3 * c.hidden_size).reshape(c.num_heads, 3, c.head_dim).transpose(1, 0, 2)
                    raw = raw.permute_rows(perm.reshape(-1))
                yield ember_name, raw
        if pending:
            raise ModelFormatError(f"{self.path}: quantized weights without all their parts: {sorted(pending)[:3]}")

    def _quant_parts(self) -> dict[str, int]:
        """Linear prefix -> how many of qweight / qzeros / scales / g_idx the files hold for it."""
        counts: dict[str, int] = {}
        for f in self.files:
            for name in self._keys(f):
                prefix, _, leaf = name.removeprefix("model.").rpartition(".")
                if leaf in _QPARTS:
                    counts[prefix] = counts.get(prefix, 0) + 1
        return {p: n for p, n in counts.items() if n >= 3}  # qweight, qzeros, scales (+ g_idx)

    def _keys(self, f: Path) -> list[str]:
        if f.suffix == ".bin":
            return list(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as sf:
            return list(sf.keys())

    def _split(self, name: str, t: torch.Tensor) -> Iterator[tuple[str, RawTensor]]:
        """Phi-3's fused qkv_proj / gate_up_proj -> the q/k/v and gate/up shards ember's loader fuses."""
        c, prefix = self.config(), name.rsplit(".", 2)[0]
        if name.endswith("qkv_proj.weight"):
            q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
            parts = [("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv)]
        else:
            half = t.shape[0] // 2
            parts = [("gate_proj", 0, half), ("up_proj", half, 2 * half)]
        for leaf, r0, r1 in parts:
            part = t[r0:r1]
            arr = part.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else part.numpy()
            full = f"{prefix}.{leaf}.weight"
            yield full, RawTensor(full, _KIND[t.dtype], tuple(part.shape), arr, float_to_f32(t.dtype))

    def _read(self, f: Path) -> Iterator[tuple[str, torch.Tensor]]:
        if f.suffix == ".bin":
            state: dict[str, Any] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
            return
        from safetensors import safe_open

        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield name, sf.get_tensor(name)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ModelFormatError(f"{f}: cannot read the safetensors file ({e}); it may be truncated") from None
