"""Gemma 3 decoder (text): scaled embeddings, q/k norms, sandwich norms, GeGLU, local/global attention.

Layers alternate sliding-window attention (rope base 10000) with a global layer every few layers
(the file's rope base, plus any rope scaling). Norm weights are used as stored: llama.cpp's converter
already folded Gemma's `x * (1 + w)` into the GGUF tensors (transformers' GGUF loader subtracts the 1
again, then adds it back in its RMSNorm, so both see the same multiplier).
"""

from __future__ import annotations

import math

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

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: [T, Dh/2] fp32
Pending = tuple[torch.Tensor | None, RMSNorm | None]  # a block output not yet added, and its post-norm


class Gemma3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        x = cfg.extra
        self.layer, self.h, self.hkv, self.dh = layer, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.sliding = x["layer_types"][layer] == "sliding_attention"
        self.window: int | None = int(x["sliding_window"]) if self.sliding else None
        q, kv = self.h * self.dh, self.hkv * self.dh
        self.qkv_proj = Linear(cfg.hidden_size, [q, kv, kv], bias=cfg.attention_bias, shards=("q", "k", "v"))
        self.o_proj = Linear(q, cfg.hidden_size)
        self.q_norm = RMSNorm(self.dh, cfg.rms_norm_eps)  # per head, before rope
        self.k_norm = RMSNorm(self.dh, cfg.rms_norm_eps)
        self.scale = float(x["query_pre_attn_scalar"]) ** -0.5
        self.softcap: float | None = x.get("attn_logit_softcapping")

    def forward(self, x: torch.Tensor, rope: Rope, ctx: ForwardContext) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x).view(t, self.h + 2 * self.hkv, self.dh)  # [T, H + 2 Hkv, Dh]
        o = qkv_attention(qkv, self.h, self.hkv, self.layer, ctx, rope, self.scale, self.window, self.softcap,
                          self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)  # [T, H, Dh]
        return self.o_proj(o.reshape(t, self.h * self.dh))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps)
        self.self_attn = Gemma3Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, "gelu_tanh")
        self.post_feedforward_layernorm = RMSNorm(d, eps)

    def forward(self, x: torch.Tensor, pending: Pending, rope: Rope, ctx: ForwardContext) -> Pending:
        """x: [T, D] fp32 residual, updated in place. Sandwich norms: each block's output is normalized
        again (fp32) before its residual add, which is fused into the next norm: `pending` is the previous
        layer's (output, its post-norm), and the return value is this layer's."""
        h = self.self_attn(self.input_layernorm.add_forward(x, *pending), rope, ctx)
        h = self.mlp(self.pre_feedforward_layernorm.add_forward(x, h, self.post_attention_layernorm))
        return h, self.post_feedforward_layernorm


class Gemma3ForCausalLM(nn.Module):
    # checkpoint module name -> (fused module, shard): parameters know how to load themselves
    packed_modules = QKV_GATE_UP

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_scale = math.sqrt(cfg.hidden_size)  # fp32 here (HF rounds it to the weight dtype)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.final_softcap: float | None = cfg.extra.get("final_logit_softcapping")
        self.inv_freq_local: torch.Tensor | None = None
        self.inv_freq_global: torch.Tensor | None = None
        self.refiner: nn.Module | None = None  # set by the loader when the head is packed
        self.decode_step: DecodeStep | None = None  # one C call per all-decode step, when the model qualifies

    def post_load(self) -> None:
        """Called once weights are in: rotary frequencies for local (no scaling) and global layers."""
        c, dev = self.config, self.norm.weight.device
        self.inv_freq_local = rope_inv_freq(c.rope_dim, float(c.extra["rope_local_base"]), None).to(dev)
        self.inv_freq_global = rope_inv_freq(c.rope_dim, c.rope_theta, c.rope_scaling).to(dev)
        self.decode_step = DecodeStep.build(self)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids: [T] flat tokens of all sequences -> hidden states [T, D]."""
        x = self.embed_tokens(input_ids) * self.embed_scale  # [T, D] fp32 residual stream
        local = rope_cos_sin(ctx.positions, self.inv_freq_local, torch.float32)  # [T, Dh/2] each, all layers
        glob = rope_cos_sin(ctx.positions, self.inv_freq_global, torch.float32)
        if self.decode_step is not None and (out := self.decode_step(x, [local, glob], ctx)) is not None:
            return out
        pending: Pending = (None, None)
        for layer in self.layers:
            pending = layer(x, pending, local if layer.self_attn.sliding else glob, ctx)
        return self.norm.add_forward(x, *pending, out_dtype=torch.float32)  # fp32: the head's refinement uses it

    def compute_logits(self, hidden: torch.Tensor, allowed: Allowed = None) -> torch.Tensor:
        """hidden: [B, D] fp32 (last position of each sequence) -> logits [B, V] in fp32."""
        logits = head_logits(self.lm_head, hidden, self.embed_tokens.out_dtype)
        if self.refiner is not None:
            logits = self.refiner(logits, hidden, allowed)
        if self.final_softcap is not None:  # monotonic: the refiner's top candidates stay the top
            logits = self.final_softcap * torch.tanh(logits / self.final_softcap)
        return logits
