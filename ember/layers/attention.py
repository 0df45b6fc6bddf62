"""Attention over the engine-owned paged KV cache, for a flat (unpadded) batch of sequences.

The runner describes the batch in a ForwardContext: every scheduled token of every sequence is one
row of the flat batch; each sequence says where its queries are and which cache slots hold its keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

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
class PagedMeta:
    """The batch as the Triton kernels read it (device tensors; under a CUDA graph, views of its static
    buffers), so the attention path needs no Python list of sequences and no host sync."""

    block_tables: torch.Tensor  # [S, max blocks] int32
    cu_q: torch.Tensor  # [S + 1] int32: sequence s owns query rows cu_q[s] .. cu_q[s+1] - 1
    ctx_lens: torch.Tensor  # [S] int32: keys in the cache after this step
    block_size: int
    segments: int = 1  # split-KV programs per query tile (decode over long contexts)
    max_q_len: int = 1  # the longest query run of the step (picks the kernel's tile shape)


@dataclass
class ForwardContext:
    positions: torch.Tensor  # [T] position of every token in the flat batch
    slot_mapping: torch.Tensor  # [T] flat cache slot each new token's k/v is written to
    seqs: list[SeqSpan]
    k_cache: list[torch.Tensor]  # per layer: [Hkv, num_slots, Dh] (head-major: a gather reads runs of Dh)
    v_cache: list[torch.Tensor]
    request_ids: list[str] | None = None  # per sequence (models that keep per-request state: the fallback)
    paged: PagedMeta | None = None  # set: attention and the cache store run as Triton kernels (the GPU path)

    @cached_property
    def row_tables(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """What the row kernel reads, built once per step: (slot tables [S, max ctx] int64, one per sequence,
        padded; the table of each row [T], or None when row i is sequence i (every sequence decodes); the
        keys each row sees [T] = its position + 1)."""
        tables = [s.kv_slots if s.kv_slots is not None else self.slot_mapping[s.q_start : s.q_start + s.q_len]
                  for s in self.seqs]
        slots = tables[0][None] if len(tables) == 1 else torch.nn.utils.rnn.pad_sequence(tables, batch_first=True)
        table_of = None
        if len(self.seqs) != self.positions.shape[0]:
            q_lens = torch.tensor([s.q_len for s in self.seqs], device=slots.device)
            table_of = torch.repeat_interleave(torch.arange(len(self.seqs), device=slots.device), q_lens)
        return slots, table_of, self.positions + 1

    @property
    def all_decode(self) -> bool:
        """Every sequence computes one token this step (row i is sequence i)."""
        return len(self.seqs) == self.positions.shape[0]


def qkv_attention(qkv: torch.Tensor, h: int, hkv: int, layer: int, ctx: ForwardContext,
                  rope: tuple[torch.Tensor, torch.Tensor], scale: float, window: int | None = None,
                  softcap: float | None = None, q_norm: torch.Tensor | None = None,
                  k_norm: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """qkv: [T, H + 2 Hkv, Dh] straight from the fused projection (modified in place) -> [T, H, Dh].

    Optional per-head q/k norms, RoPE (cos/sin [T, rd/2] fp32) and the cache write happen in one fused op.
    """
    if ctx.paged is not None:
        from ember.kernels.triton.rope_store import rope_store

        rope_store(qkv, h, hkv, *rope, ctx.k_cache[layer], ctx.v_cache[layer], ctx.slot_mapping, q_norm, k_norm, eps)
    else:
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
    if ctx.paged is not None:  # the store kernel skips padding rows (slot < 0); no rotary to apply
        from ember.kernels.triton.rope_store import rope_store

        h, hkv = q.shape[1], k.shape[1]
        rope_store(torch.cat((q, k, v), 1), h, hkv, None, None, kc, vc, ctx.slot_mapping)
        return attend(q, k, v, layer, ctx, scale, window, softcap, alibi)
    kc.index_copy_(1, ctx.slot_mapping, k.transpose(0, 1))
    vc.index_copy_(1, ctx.slot_mapping, v.transpose(0, 1))
    return attend(q, k, v, layer, ctx, scale, window, softcap, alibi)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, ctx: ForwardContext, scale: float,
           window: int | None = None, softcap: float | None = None, alibi: torch.Tensor | None = None
           ) -> torch.Tensor:
    """Attention for the new tokens, whose k/v are already in the cache. q: [T, H, Dh], k/v: [T, Hkv, Dh]."""
    kc, vc = ctx.k_cache[layer], ctx.v_cache[layer]
    if (p := ctx.paged) is not None:  # one launch for the whole mixed batch
        from ember.kernels.triton.attention import attention

        return attention(q, kc, vc, p.block_tables, p.cu_q, p.ctx_lens, p.block_size, scale, window, softcap,
                         alibi, p.segments, max_q_len=p.max_q_len)
    if alibi is None and ops.decode_attention_ok(q, kc):
        # ember's row kernel for every row, prompt rows too: a row's numbers are then the same whether its
        # prompt is computed at once, in chunks, after a cached prefix, or beside any neighbours
        slots, table_of, lens = ctx.row_tables
        return ops.decode_attention(q, kc, vc, slots, lens, scale, window, softcap, table_of)
    k, v = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, T, Dh]
    q = q.transpose(0, 1)  # [H, T, Dh]
    outs = []
    # one SDPA per sequence, over exactly its keys: a padded batch would be fewer calls, but its rows change
    # in the last bits with the neighbours' lengths (tested), and batched output must equal single output
    for s in ctx.seqs:
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
        outs.append(_attend(qs, ks, vs, mask, causal, scale, softcap, alibi, k0))  # [H, n, Dh]
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
