"""The transformers fallback: any causal LM transformers can load, behind ember's engine surface.

Architectures without a native ember model run as a transformers `AutoModelForCausalLM`: the engine
still schedules, batches, samples, detokenizes and serves them, but each sequence keeps its own
transformers KV cache (a DynamicCache by request id) and runs its own forward, with no packed
kernels - correct and slower. ember's paged cache is allocated tiny and never touched.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ember.config import ModelConfig
from ember.errors import ModelFormatError
from ember.layers.attention import ForwardContext


class TransformersFallback(nn.Module):
    def __init__(self, hf_model: Any, config: ModelConfig) -> None:
        super().__init__()
        self.hf, self.config = hf_model, config
        self.caches: dict[str, Any] = {}  # request id -> its transformers cache

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids: [T] new tokens of all sequences -> their logits [T, V] (fp32): the runner's "hidden
        states" here, since a transformers model applies its own head (and any soft-cap or scale)."""
        from transformers import DynamicCache

        outs = []
        for i, s in enumerate(ctx.seqs):
            rid = ctx.request_ids[i] if ctx.request_ids else None
            start = s.ctx_len - s.q_len
            if rid is None or start == 0:  # a new (or preempted and restarted) sequence
                cache = DynamicCache()
                if rid is not None:
                    self.caches[rid] = cache
            else:
                cache = self.caches[rid]
            ids = input_ids[s.q_start : s.q_start + s.q_len][None]  # [1, n]
            pos = torch.arange(start, s.ctx_len, device=ids.device)[None]
            out = self.hf(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
            outs.append(out.logits[0].float())  # [n, V]
        return torch.cat(outs)

    def compute_logits(self, hidden: torch.Tensor, allowed: object = None) -> torch.Tensor:
        return hidden  # already logits (exact: nothing to refine)

    def release(self, request_id: str) -> None:
        self.caches.pop(request_id, None)

    def post_load(self) -> None:
        pass


def load_fallback(path: Path, hf_config: dict[str, Any], dtype: torch.dtype, device: torch.device
                  ) -> tuple[TransformersFallback, ModelConfig]:
    try:
        import transformers
    except ImportError:
        raise ModelFormatError(
            f"{path}: architecture {hf_config.get('architectures')} has no native ember model; install "
            "transformers (pip install transformers) to run it through ember's fallback backend") from None
    arch = (hf_config.get("architectures") or [hf_config.get("model_type", "?")])[0]
    warnings.warn(f"{arch} has no native ember model: it runs through transformers (the fallback backend: "
                  "batched and served by ember, but without its kernels, so slower)", stacklevel=3)
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    except (ValueError, OSError, KeyError) as e:
        raise ModelFormatError(f"{path}: transformers cannot load {arch} either: {e}") from None
    c = hf.config
    cfg = ModelConfig(
        architecture=f"transformers:{arch}",
        vocab_size=int(c.vocab_size), hidden_size=int(getattr(c, "hidden_size", 8) or 8),
        intermediate_size=1, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,  # ember's cache stays tiny
        max_position_embeddings=int(getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", 2048)),
    )
    return TransformersFallback(hf, cfg), cfg
