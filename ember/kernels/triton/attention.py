"""Paged attention for a mixed batch (prompt chunks and decode rows together) in one launch per layer.

Layout (ember's own, see layers/attention.py): k/v caches [Hkv, slots, Dh], slot = block * block_size +
offset, one block table per sequence. The flat batch holds every new query row of every sequence;
sequence s owns rows cu_q[s] .. cu_q[s+1]-1 and, after this step, ctx_lens[s] keys in the cache, so its
queries sit at positions ctx_len - q_len ... ctx_len - 1 (causal inside the step).

One program = one tile of BLOCK_Q queries of one sequence x the H/Hkv query heads sharing one KV head
(BLOCK_M = BLOCK_Q * heads-per-kv rows, so GQA reads each key tile once for all of its heads). Programs
are numbered over all sequences at once: sequence s's tiles start at cu_q[s] // BLOCK_Q + s, found by
binary search, which keeps the grid a function of (rows, sequences) only, as a CUDA graph needs.
Long contexts with few rows split the keys into segments (one program each) merged by a second kernel.
The design follows the public description of vLLM's Triton "unified attention"; the code is ember's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.kernels.triton import interpreting


@triton.jit
def _seq_of(cu_q_ptr, pid, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose query tiles include program pid (last s with cu_q[s] // BLOCK_Q + s <= pid)."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_q_ptr + mid) // BLOCK_Q + mid <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))  # stable for large |x|
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, po_ptr, pm_ptr, pl_ptr,
    tables_ptr, cu_q_ptr, ctx_lens_ptr, alibi_ptr,
    scale, softcap, window, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kh, stride_tab, num_heads,
    HPK: tl.constexpr, DH: tl.constexpr, DH_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, SEGMENTS: tl.constexpr,
    SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, ALIBI: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    seg = tl.program_id(2)
    s = _seq_of(cu_q_ptr, pid, num_seqs, BLOCK_Q)
    q0 = tl.load(cu_q_ptr + s)
    q_len = tl.load(cu_q_ptr + s + 1) - q0
    qb = pid - (q0 // BLOCK_Q + s)  # this program's query tile within its sequence
    if qb * BLOCK_Q < q_len:
        ctx_len = tl.load(ctx_lens_ptr + s).to(tl.int32)  # int32 or int64 lengths (the graph buffers)
        m = tl.arange(0, BLOCK_M)
        qi = qb * BLOCK_Q + m // HPK  # query index within the sequence, per row
        head = kvh * HPK + m % HPK
        row_ok = (qi < q_len) & (m // HPK < BLOCK_Q)
        qpos = ctx_len - q_len + qi  # [BLOCK_M] position of each row's query
        d = tl.arange(0, DH_P)
        d_ok = d < DH
        rows = (q0 + qi).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, DH_P]
        # keys any row of the tile can see: [lo, hi)
        hi = ctx_len - q_len + tl.minimum((qb + 1) * BLOCK_Q, q_len)
        lo = 0
        if WINDOW:
            lo = tl.maximum(0, ctx_len - q_len + qb * BLOCK_Q - window + 1)
        if SEGMENTS > 1:  # this program's share: a run of whole tiles
            per = tl.cdiv(tl.cdiv(hi - lo, TILE_N), SEGMENTS) * TILE_N
            lo = lo + seg * per
            hi = tl.minimum(hi, lo + per)
        if ALIBI:
            slope = tl.load(alibi_ptr + head, mask=row_ok, other=0.0).to(tl.float32)
        mx = tl.full([BLOCK_M], float("-inf"), tl.float32)
        den = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DH_P], tl.float32)
        kv_base = kvh.to(tl.int64) * stride_kh
        for start in range(lo, hi, TILE_N):
            kp = start + tl.arange(0, TILE_N)  # [TILE_N] key positions
            k_ok = kp < hi
            blk = tl.load(tables_ptr + s.to(tl.int64) * stride_tab + kp // BLOCK_SIZE, mask=k_ok, other=0)
            slot = blk.to(tl.int64) * BLOCK_SIZE + kp % BLOCK_SIZE
            kt = tl.load(k_ptr + kv_base + slot[None, :] * DH + d[:, None],
                         mask=d_ok[:, None] & k_ok[None, :], other=0.0)  # [DH_P, TILE_N]
            sc = tl.dot(q, kt, input_precision=PREC) * scale  # [BLOCK_M, TILE_N] fp32
            if SOFTCAP:
                sc = softcap * _tanh(sc / softcap)
            if ALIBI:  # slope * key position; softmax ignores the per-query shift that makes it relative
                sc += slope[:, None] * kp[None, :].to(tl.float32)
            vis = row_ok[:, None] & k_ok[None, :] & (kp[None, :] <= qpos[:, None])
            if WINDOW:
                vis = vis & (kp[None, :] > qpos[:, None] - window)
            sc = tl.where(vis, sc, float("-inf"))
            new = tl.maximum(mx, tl.max(sc, 1))
            safe = tl.where(new > float("-inf"), new, 0.0)  # rows that saw no key yet stay at zero weight
            p = tl.exp(sc - safe[:, None])
            alpha = tl.exp(mx - safe)
            den = den * alpha + tl.sum(p, 1)
            vt = tl.load(v_ptr + kv_base + slot[:, None] * DH + d[None, :],
                         mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # [TILE_N, DH_P]
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
            mx = new
        if SEGMENTS == 1:
            out = acc / tl.where(den > 0, den, 1.0)[:, None]
            tl.store(o_ptr + rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        else:  # partials [T, H, SEGMENTS] (+ DH_P), merged by _merge_kernel
            part = (rows * num_heads + head) * SEGMENTS + seg
            tl.store(pm_ptr + part, mx, mask=row_ok)
            tl.store(pl_ptr + part, den, mask=row_ok)
            tl.store(po_ptr + part[:, None] * DH_P + d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _merge_kernel(o_ptr, po_ptr, pm_ptr, pl_ptr, stride_ot, stride_oh, num_heads,
                  DH: tl.constexpr, DH_P: tl.constexpr, SEGMENTS: tl.constexpr):
    """One program per (row, head): the segments' partial softmax sums rescaled to a common max."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, SEGMENTS)
    d = tl.arange(0, DH_P)
    base = (r.to(tl.int64) * num_heads + h) * SEGMENTS
    mx = tl.load(pm_ptr + base + g)  # [SEGMENTS]
    top = tl.max(mx, 0)
    w = tl.where(mx > float("-inf"), tl.exp(mx - tl.where(top > float("-inf"), top, 0.0)), 0.0)
    den = tl.sum(tl.load(pl_ptr + base + g) * w, 0)
    acc = tl.load(po_ptr + (base + g)[:, None] * DH_P + d[None, :])  # [SEGMENTS, DH_P]
    out = tl.sum(acc * w[:, None], 0) / tl.where(den > 0, den, 1.0)
    tl.store(o_ptr + r.to(tl.int64) * stride_ot + h * stride_oh + d, out.to(o_ptr.dtype.element_ty), mask=d < DH)


def tile_rows(num_heads: int, num_kv_heads: int, head_dim: int, max_q_len: int = 1, half: bool = True
              ) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_M): query tokens per program and rows (tokens x heads per KV head, >= 16 for tl.dot).
    Steps with long prompt chunks take 64 rows, so each key tile loaded serves 4x more queries; decode keeps
    16 (one token x its group of heads); heads wider than 128 and fp32 keep 16 (registers: fp32 64-row tiles of
    128-wide heads spill ~9 KB per thread on sm_90)."""
    hpk = num_heads // num_kv_heads
    block_m = max(16, triton.next_power_of_2(hpk))
    if max_q_len >= 64 and head_dim <= 128 and half:
        block_m = max(block_m, 64)
    return block_m // hpk, block_m


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
              cu_q: torch.Tensor, ctx_lens: torch.Tensor, block_size: int, scale: float,
              window: int | None = None, softcap: float | None = None, alibi: torch.Tensor | None = None,
              segments: int = 1, out: torch.Tensor | None = None, max_q_len: int = 1) -> torch.Tensor:
    """q: [T, H, Dh] (any row/head strides, last dim contiguous); caches [Hkv, slots, Dh]; block_tables
    [S, max blocks] int32; cu_q [S+1] int32; ctx_lens [S] int32 -> out [T, H, Dh] in q's dtype.

    segments > 1 splits every tile's keys into that many programs (decode over long contexts, where one
    program per (sequence, kv head) would leave the GPU idle); it must be a power of two."""
    t, h, dh = q.shape
    hkv = k_cache.shape[0]
    assert q.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous() and h % hkv == 0
    assert segments >= 1 and segments & (segments - 1) == 0, "segments must be a power of two"
    block_q, block_m = tile_rows(h, hkv, dh, max_q_len, q.dtype != torch.float32)
    num_seqs = ctx_lens.shape[0]
    out = torch.empty(t, h, dh, dtype=q.dtype, device=q.device) if out is None else out
    dh_p = max(16, triton.next_power_of_2(dh))
    if segments > 1:
        po = torch.empty(t, h, segments, dh_p, dtype=torch.float32, device=q.device)
        pm = torch.empty(t, h, segments, dtype=torch.float32, device=q.device)
        pl = torch.empty(t, h, segments, dtype=torch.float32, device=q.device)
    else:
        po = pm = pl = out  # unused
    grid = (t // block_q + num_seqs, hkv, segments)
    _attention_kernel[grid](
        q, k_cache, v_cache, out, po, pm, pl, block_tables, cu_q, ctx_lens,
        alibi if alibi is not None else ctx_lens,
        scale, softcap or 0.0, window or 0, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), block_tables.stride(0), h,
        HPK=h // hkv, DH=dh, DH_P=dh_p, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_SIZE=block_size,
        TILE_N=16 if interpreting() else 32, SEGMENTS=segments, SOFTCAP=softcap is not None,
        WINDOW=window is not None, ALIBI=alibi is not None,
        PREC="ieee" if q.dtype == torch.float32 else None,  # fp32 caches: no silent tf32
    )
    if segments > 1:
        _merge_kernel[(t, h)](out, po, pm, pl, out.stride(0), out.stride(1), h, DH=dh, DH_P=dh_p, SEGMENTS=segments)
    return out
