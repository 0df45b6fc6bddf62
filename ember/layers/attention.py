"""Attention over the engine-owned paged KV cache, for a flat (unpadded) batch of sequences.

The runner describes the batch in a ForwardContext: every scheduled token of every sequence is one
row of the flat batch; each sequence says where its queries are and which cache slots hold its keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.kernels import ops


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
    # set by the runner for the sequences that decode one token: padded slot tables for the decode kernel
    decode_slots: torch.Tensor | None = None  # [B, max ctx] int64
    decode_lens: torch.Tensor | None = None  # [B] int64
    decode_rows: torch.Tensor | None = None  # [B] their rows in the flat batch; None: every row decodes
    request_ids: list[str] | None = None  # per sequence (models that keep per-request state: the fallback)


def qkv_attention(qkv: torch.Tensor, h: int, hkv: int, layer: int, ctx: ForwardContext,
                  rope: tuple[torch.Tensor, torch.Tensor], scale: float, window: int | None = None,
                  softcap: float | None = None, q_norm: torch.Tensor | None = None,
                  k_norm: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """qkv: [T, H + 2 Hkv, Dh] straight from the fused projection (modified in place) -> [T, H, Dh].

    Optional per-head q/k norms, RoPE (cos/sin [T, rd/2] fp32) and the cache write happen in one fused op.
    """
    ops.rope_store(qkv, h, hkv, *rope, ctx.k_cache[layer], ctx.v_cache[layer], ctx.slot_mapping,
                   q_norm, k_norm, eps)
    q, k, v = qkv[:, :h], qkv[:, h : h + hkv], qkv[:, h + hkv :]
    return attend(q, k, v, layer, ctx, scale, window, softcap)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, ctx: ForwardContext,
                    scale: float, window: int | None = None, softcap: float | None = None,
                    alibi: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, H, Dh], k/v: [T, Hkv, Dh] for the new tokens (no rotary: ALiBi models) -> [T, H, Dh].

    window: sliding-window attention, a query at position p sees keys in (p - window, p].
    softcap: scores become softcap * tanh(scores / softcap) before the mask (Gemma 2 style).
    alibi: per-head slopes [H]; scores get slope * key position (Bloom)."""
    kc, vc = ctx.k_cache[layer], ctx.v_cache[layer]
    kc.index_copy_(1, ctx.slot_mapping, k.transpose(0, 1))
    vc.index_copy_(1, ctx.slot_mapping, v.transpose(0, 1))
    return attend(q, k, v, layer, ctx, scale, window, softcap, alibi)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, ctx: ForwardContext, scale: float,
           window: int | None = None, softcap: float | None = None, alibi: torch.Tensor | None = None
           ) -> torch.Tensor:
    """Attention for the new tokens, whose k/v are already in the cache. q: [T, H, Dh], k/v: [T, Hkv, Dh]."""
    kc, vc = ctx.k_cache[layer], ctx.v_cache[layer]
    kernel = ctx.decode_slots is not None and alibi is None and ops.decode_attention_ok(q, kc)
    if kernel and ctx.decode_rows is None:
        return ops.decode_attention(q, kc, vc, ctx.decode_slots, ctx.decode_lens, scale, window, softcap)
    # a decoding sequence takes the decode kernel in mixed batches too, so its numbers never depend on
    # whether a neighbour is prefilling in the same step
    out = torch.empty_like(q) if kernel else None
    if kernel:
        rows = ctx.decode_rows
        out[rows] = ops.decode_attention(q[rows], kc, vc, ctx.decode_slots, ctx.decode_lens, scale, window, softcap)
    k, v = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, T, Dh]
    q = q.transpose(0, 1)  # [H, T, Dh]
    outs = []
    # one SDPA per sequence, over exactly its keys: a padded batch would be fewer calls, but its rows change
    # in the last bits with the neighbours' lengths (tested), and batched output must equal single output
    for s in ctx.seqs:
        if kernel and s.q_len == 1 and s.kv_slots is not None:
            continue
        qs = q[:, s.q_start : s.q_start + s.q_len]  # [H, n, Dh]
        k0 = 0  # position of the first key attended to
        if s.kv_slots is None:  # whole context is in this step: use the fresh k/v, causal mask
            ks, vs = k[:, s.q_start : s.q_start + s.q_len], v[:, s.q_start : s.q_start + s.q_len]
        else:
            slots = s.kv_slots
            if window is not None:  # keys older than every query's window are not even gathered
                k0 = max(0, s.ctx_len - s.q_len + 1 - window)
                slots = slots[k0:]
            ks, vs = kc.index_select(1, slots), vc.index_select(1, slots)  # [Hkv, ctx - k0, Dh]
        # plain causal when the step holds the whole context and no window cuts into it
        causal = s.kv_slots is None and s.q_len > 1 and (window is None or s.q_len <= window)
        mask = None
        if s.q_len > 1 and not causal:  # decode (q_len 1) sees every gathered key
            mask = _mask(s.ctx_len - s.q_len, s.q_len, k0, s.ctx_len, window, q.device)
        o = _attend(qs, ks, vs, mask, causal, scale, softcap, alibi, k0)  # [H, n, Dh]
        if out is not None:
            out[s.q_start : s.q_start + s.q_len] = o.transpose(0, 1)
        else:
            outs.append(o)
    if out is not None:
        return out
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return o.transpose(0, 1)  # [T, H, Dh]


def _mask(q0: int, n: int, k0: int, k1: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[n, k1 - k0] bool: queries at positions q0.., keys at k0..k1-1; True where the key is visible."""
    qp = torch.arange(q0, q0 + n, device=device)[:, None]
    kp = torch.arange(k0, k1, device=device)[None, :]
    keep = kp <= qp
    return keep if window is None else keep & (kp > qp - window)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
            scale: float, softcap: float | None, alibi: torch.Tensor | None = None, k0: int = 0) -> torch.Tensor:
    """q: [H, n, Dh], k/v: [Hkv, m, Dh] (keys at positions k0 ..) -> [H, n, Dh]."""
    gqa = q.shape[0] != k.shape[0]
    if softcap is None and alibi is None:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=causal,
                                              scale=scale, enable_gqa=gqa)[0]
    # SDPA has no soft-capping or ALiBi: explicit scores (rare paths: Gemma 2-style caps, Bloom)
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)  # [H, m, Dh]
    s = (q @ k.transpose(1, 2)).float() * scale  # [H, n, m]
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if alibi is not None:  # slope * key position; a per-query shift, which softmax ignores, makes it relative
        kpos = torch.arange(k0, k0 + k.shape[1], device=q.device, dtype=torch.float32)
        s = s + alibi.float()[:, None, None] * kpos[None, None, :]
    if causal:
        mask = torch.ones(s.shape[1:], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1).to(v.dtype) @ v
