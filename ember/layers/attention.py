"""Attention over the engine-owned paged KV cache, for a flat (unpadded) batch of sequences.

The runner describes the batch in a ForwardContext: every scheduled token of every sequence is one
row of the flat batch; each sequence says where its queries are and which cache slots hold its keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SeqSpan:
    q_start: int  # first row of this sequence's queries in the flat batch
    q_len: int  # queries (new tokens) this step
    ctx_len: int  # tokens in the cache after this step (its keys are positions 0 .. ctx_len-1)
    kv_slots: torch.Tensor | None  # [ctx_len] flat cache slots; None when the step holds the whole context


@dataclass
class ForwardContext:
    positions: torch.Tensor  # [T] position of every token in the flat batch
    slot_mapping: torch.Tensor  # [T] flat cache slot each new token's k/v is written to
    seqs: list[SeqSpan]
    k_cache: list[torch.Tensor]  # per layer: [Hkv, num_slots, Dh] (head-major: a gather reads runs of Dh)
    v_cache: list[torch.Tensor]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, ctx: ForwardContext,
                    scale: float) -> torch.Tensor:
    """q: [T, H, Dh], k/v: [T, Hkv, Dh] for the new tokens -> [T, H, Dh]."""
    kc, vc = ctx.k_cache[layer], ctx.v_cache[layer]
    k, v = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, T, Dh]
    kc.index_copy_(1, ctx.slot_mapping, k)
    vc.index_copy_(1, ctx.slot_mapping, v)
    gqa = q.shape[1] != k.shape[0]
    q = q.transpose(0, 1)  # [H, T, Dh]
    outs = []
    for s in ctx.seqs:
        qs = q[:, s.q_start : s.q_start + s.q_len]  # [H, n, Dh]
        if s.kv_slots is None:  # whole context is in this step: use the fresh k/v, causal mask
            ks, vs = k[:, s.q_start : s.q_start + s.q_len], v[:, s.q_start : s.q_start + s.q_len]
        else:
            ks, vs = kc.index_select(1, s.kv_slots), vc.index_select(1, s.kv_slots)  # [Hkv, ctx, Dh]
        mask = None
        causal = s.kv_slots is None and s.q_len > 1
        if s.kv_slots is not None and s.q_len > 1:
            # query i sits at position ctx_len - q_len + i and sees keys 0 .. that position
            mask = torch.ones(s.q_len, s.ctx_len, dtype=torch.bool, device=q.device).tril(s.ctx_len - s.q_len)
        o = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], attn_mask=mask, is_causal=causal,
                                           scale=scale, enable_gqa=gqa)[0]  # [H, n, Dh]
        outs.append(o)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return o.transpose(0, 1)  # [T, H, Dh]
