"""The step's new keys and values into the paged cache, in one launch per layer: optional per-head RMS norms
of q and k (Qwen3, Gemma 3), rotary embedding of q and k in place (rotate-half, partial allowed), then k and v
written to their slots. A slot < 0 is a padding row of a CUDA-graph bucket: its cache write is skipped."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_store_kernel(qkv_ptr, cos_ptr, sin_ptr, qn_ptr, kn_ptr, kc_ptr, vc_ptr, slots_ptr, eps,
                       stride_t, stride_cs, stride_kh,
                       NQ: tl.constexpr, NKV: tl.constexpr, DH: tl.constexpr, HALF: tl.constexpr,
                       HALF_P: tl.constexpr, REST_P: tl.constexpr, DH_P: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)  # 0..NQ-1 query heads, then NKV key heads, then NKV value heads
    row = qkv_ptr + t * stride_t + h * DH
    slot = tl.load(slots_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF_P)
    r = 2 * HALF + tl.arange(0, REST_P)  # dims past the rotary part
    i_ok = i < HALF
    r_ok = r < DH
    if h < NQ + NKV:
        x1 = tl.load(row + i, mask=i_ok, other=0.0).to(tl.float32)
        x2 = tl.load(row + HALF + i, mask=i_ok, other=0.0).to(tl.float32)
        x3 = tl.load(row + r, mask=r_ok, other=0.0).to(tl.float32)
        if NORM:  # rms over the whole head, then the head's weight; rounded to the model dtype as torch does
            inv = tl.rsqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0) + tl.sum(x3 * x3, 0)) / DH + eps)
            is_q = h < NQ  # q heads take q_norm's weight, k heads k_norm's (one of the two loads is masked off)
            w1 = tl.load(qn_ptr + i, mask=i_ok & is_q, other=0.0) + tl.load(kn_ptr + i, mask=i_ok & ~is_q, other=0.0)
            w2 = (tl.load(qn_ptr + HALF + i, mask=i_ok & is_q, other=0.0)
                  + tl.load(kn_ptr + HALF + i, mask=i_ok & ~is_q, other=0.0))
            w3 = tl.load(qn_ptr + r, mask=r_ok & is_q, other=0.0) + tl.load(kn_ptr + r, mask=r_ok & ~is_q, other=0.0)
            x1 = (x1 * inv * w1).to(qkv_ptr.dtype.element_ty).to(tl.float32)
            x2 = (x2 * inv * w2).to(qkv_ptr.dtype.element_ty).to(tl.float32)
            x3 = (x3 * inv * w3).to(qkv_ptr.dtype.element_ty).to(tl.float32)
            tl.store(row + r, x3.to(qkv_ptr.dtype.element_ty), mask=r_ok)
        if ROPE:
            c = tl.load(cos_ptr + t * stride_cs + i, mask=i_ok, other=0.0)
            s = tl.load(sin_ptr + t * stride_cs + i, mask=i_ok, other=0.0)
            r1 = x1 * c - x2 * s
            x2 = x2 * c + x1 * s
            x1 = r1
        y1 = x1.to(qkv_ptr.dtype.element_ty)
        y2 = x2.to(qkv_ptr.dtype.element_ty)
        tl.store(row + i, y1, mask=i_ok)
        tl.store(row + HALF + i, y2, mask=i_ok)
        if (h >= NQ) & (slot >= 0):
            dst = kc_ptr + (h - NQ) * stride_kh + slot * DH
            tl.store(dst + i, y1.to(kc_ptr.dtype.element_ty), mask=i_ok)
            tl.store(dst + HALF + i, y2.to(kc_ptr.dtype.element_ty), mask=i_ok)
            tl.store(dst + r, x3.to(kc_ptr.dtype.element_ty), mask=r_ok)
    elif slot >= 0:  # a value head: copied as it is
        d = tl.arange(0, DH_P)
        v = tl.load(row + d, mask=d < DH)
        tl.store(vc_ptr + (h - NQ - NKV) * stride_kh + slot * DH + d, v.to(vc_ptr.dtype.element_ty), mask=d < DH)


def rope_store(qkv: torch.Tensor, nq: int, nkv: int, cos: torch.Tensor | None, sin: torch.Tensor | None,
               k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
               q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-6) -> None:
    """qkv: [T, nq + 2 nkv, Dh] contiguous (in place); cos/sin [T, rd/2] fp32 or None (no rotary: ALiBi
    models); caches [nkv, slots, Dh]; slots [T] (int, < 0 = skip)."""
    t, heads, dh = qkv.shape
    assert qkv.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous() and heads == nq + 2 * nkv
    half = 0 if cos is None else cos.shape[-1]
    rest = dh - 2 * half
    trig = cos if cos is not None else slots  # unused pointer when there is no rotary
    norm = q_norm is not None
    _rope_store_kernel[(t, heads)](
        qkv, trig, sin if sin is not None else slots, q_norm if norm else slots, k_norm if norm else slots,
        k_cache, v_cache, slots, eps, qkv.stride(0), trig.stride(0), k_cache.stride(0),
        NQ=nq, NKV=nkv, DH=dh, HALF=half, HALF_P=max(1, triton.next_power_of_2(half)),
        REST_P=max(1, triton.next_power_of_2(rest)), DH_P=triton.next_power_of_2(dh), NORM=norm, ROPE=cos is not None,
        num_warps=1)  # a program handles one head row (64-256 values): one warp is plenty
