"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Phi-3, SmolLM): RMSNorm, RoPE, GQA, SwiGLU, tied or separate
head; Qwen3 adds a per-head RMSNorm of q and k before RoPE (`extra["qk_norm"]`)."""

from __future__ import annotations

import torch
from torch import nn

from ember.config import ModelConfig
from ember.layers.attention import ForwardContext, qkv_attention
from ember.layers.embedding import Embedding
from ember.layers.linear import QKV_GATE_UP, Linear
from ember.layers.logits import Allowed, head_logits
from ember.layers.mlp import GatedMLP
from ember.layers.norm import RMSNorm
from ember.layers.rotary import rope_cos_sin, rope_inv_freq
from ember.models.decode_step import DecodeStep


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.h, self.hkv, self.dh = layer, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, kv = self.h * self.dh, self.hkv * self.dh
        self.qkv_proj = Linear(cfg.hidden_size, [q, kv, kv], bias=cfg.attention_bias, shards=("q", "k", "v"))
        self.o_proj = Linear(q, cfg.hidden_size)
        self.scale = self.dh**-0.5
        self.q_norm = RMSNorm(self.dh, cfg.rms_norm_eps) if cfg.extra.get("qk_norm") else None
        self.k_norm = RMSNorm(self.dh, cfg.rms_norm_eps) if cfg.extra.get("qk_norm") else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: ForwardContext) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x).view(t, self.h + 2 * self.hkv, self.dh)  # [T, H + 2 Hkv, Dh]
        qn, kn = (None, None) if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight)  # type: ignore[union-attr]
        o = qkv_attention(qkv, self.h, self.hkv, self.layer, ctx, rope, self.scale, q_norm=qn, k_norm=kn,
                          eps=self.q_norm.eps if self.q_norm is not None else 1e-6)  # [T, H, Dh]
        return self.o_proj(o.reshape(t, self.h * self.dh))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, "silu")

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor],
                ctx: ForwardContext) -> torch.Tensor:
        """x: [T, D] fp32 residual stream, updated in place; delta: the previous layer's output, still to be
        added (its add is fused into this layer's first norm). Returns this layer's pending output."""
        a = self.self_attn(self.input_layernorm.add_forward(x, delta), rope, ctx)
        return self.mlp(self.post_attention_layernorm.add_forward(x, a))


class LlamaForCausalLM(nn.Module):
    # checkpoint module name -> (fused module, shard): parameters know how to load themselves
    packed_modules = QKV_GATE_UP

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.register_buffer("rope_freqs", torch.ones(cfg.rope_dim // 2), persistent=False)  # type: ignore[operator]
        self.inv_freq: torch.Tensor | None = None
        self.refiner: nn.Module | None = None  # set by the loader when the head is packed
        self.decode_step: DecodeStep | None = None  # one C call per all-decode step, when the model qualifies

    def post_load(self) -> None:
        """Called once weights are in: derive the rotary frequencies (they may depend on a loaded tensor)."""
        c = self.config
        self.inv_freq = rope_inv_freq(c.rope_dim, c.rope_theta, c.rope_scaling, self.rope_freqs).to(
            self.rope_freqs.device)
        self.decode_step = DecodeStep.build(self)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids: [T] flat tokens of all sequences -> hidden states [T, D]."""
        x = self.embed_tokens(input_ids)  # [T, D] fp32 residual stream
        rope = rope_cos_sin(ctx.positions, self.inv_freq, torch.float32)  # cos, sin: [T, rd/2]
        if self.decode_step is not None and (out := self.decode_step(x, [rope], ctx)) is not None:
            return out
        delta = None
        for layer in self.layers:
            delta = layer(x, delta, rope, ctx)
        return self.norm.add_forward(x, delta, out_dtype=torch.float32)  # fp32: the head's refinement uses it

    def compute_logits(self, hidden: torch.Tensor, allowed: Allowed = None) -> torch.Tensor:
        """hidden: [B, D] fp32 (last position of each sequence) -> logits [B, V] in fp32. allowed: the
        structured-output rows and their allowed tokens (the exact candidates are taken among those)."""
        logits = head_logits(self.lm_head, hidden, self.embed_tokens.out_dtype)
        return logits if self.refiner is None else self.refiner(logits, hidden, allowed)
