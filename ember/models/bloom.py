"""Bloom decoder: LayerNorms with bias (one right after the embedding), ALiBi instead of rotary positions,
fused query_key_value, a GELU (tanh) MLP, the head tied to the embedding. The architecture of
bitsandbytes' generation test.

The checkpoint interleaves q, k and v per head ([H, 3, Dh] rows); the reader reorders them to
[3, H, Dh] so the fused projection reads like every other model's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ember.config import ModelConfig
from ember.layers.attention import ForwardContext, paged_attention
from ember.layers.embedding import Embedding
from ember.layers.linear import Linear
from ember.layers.logits import Allowed, head_logits


def alibi_slopes(heads: int) -> torch.Tensor:
    """Per-head slopes [H]: a geometric series from 2^(-8/n) for the nearest power of two n, then the
    odd powers of the next one's base for the remaining heads (the ALiBi paper's recipe)."""
    n = 2 ** math.floor(math.log2(heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
    slopes = [base ** (i + 1) for i in range(n)]
    if n != heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * n) - 3)))
        slopes += [extra ** (2 * i + 1) for i in range(min(n, heads - n))]
    return torch.tensor(slopes, dtype=torch.float32)


class BloomAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.h, self.dh = layer, cfg.num_heads, cfg.head_dim
        d = cfg.hidden_size
        self.query_key_value = Linear(d, 3 * d, bias=True)  # rows [q heads; k heads; v heads] after reordering
        self.dense = Linear(d, d, bias=True)
        self.scale = self.dh**-0.5

    def forward(self, x: torch.Tensor, ctx: ForwardContext, slopes: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.query_key_value(x).view(t, 3 * self.h, self.dh)  # [T, 3H, Dh]
        q, k, v = qkv[:, : self.h], qkv[:, self.h : 2 * self.h], qkv[:, 2 * self.h :]
        o = paged_attention(q, k, v, self.layer, ctx, self.scale, alibi=slopes)  # [T, H, Dh]
        return self.dense(o.reshape(t, self.h * self.dh))


class BloomMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.dense_4h_to_h = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class BloomBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = nn.LayerNorm(d, eps)
        self.self_attention = BloomAttention(cfg, layer)
        self.post_attention_layernorm = nn.LayerNorm(d, eps)
        self.mlp = BloomMLP(cfg)
        self.post_ln_residual = bool(cfg.extra.get("apply_residual_connection_post_layernorm"))

    def forward(self, x: torch.Tensor, ctx: ForwardContext, slopes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x: [T, D] fp32 residual stream -> the next one."""
        ln = self.input_layernorm(x)
        x = (ln if self.post_ln_residual else x) + self.self_attention(ln.to(dtype), ctx, slopes).float()
        ln = self.post_attention_layernorm(x)
        return (ln if self.post_ln_residual else x) + self.mlp(ln.to(dtype)).float()


class BloomForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_norm = nn.LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(BloomBlock(cfg, i) for i in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.register_buffer("slopes", alibi_slopes(cfg.num_heads), persistent=False)
        self.refiner: nn.Module | None = None  # set by the loader when the head is packed

    def post_load(self) -> None:
        for m in self.modules():  # LayerNorms run in fp32 on the fp32 residual stream
            if isinstance(m, nn.LayerNorm):
                m.float()
        self.slopes = self.slopes.to(self.norm.weight.device)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids: [T] flat tokens of all sequences -> hidden states [T, D] (fp32)."""
        dtype = self.embed_tokens.out_dtype
        x = self.embed_norm(self.embed_tokens(input_ids))  # [T, D]
        for layer in self.layers:
            x = layer(x, ctx, self.slopes, dtype)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor, allowed: Allowed = None) -> torch.Tensor:
        """hidden: [B, D] fp32 -> logits [B, V] fp32."""
        logits = head_logits(self.lm_head, hidden, self.embed_tokens.out_dtype)
        return logits if self.refiner is None else self.refiner(logits, hidden, allowed)
