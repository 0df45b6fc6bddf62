"""Fused decode-path ops: the C kernels when they apply (CPU, bf16 activations), else plain PyTorch.

Both paths compute the same thing; tests/unit/test_kernels.py holds them to each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.kernels import cpu_ops

ACTS = {"silu": 0, "gelu_tanh": 1}


def _p(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                out_dtype: torch.dtype, post_weight: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, D] fp32 residual, updated in place: x += delta (normalized by post_weight first when given);
    returns rms_norm(x) * weight in out_dtype."""
    lib = cpu_ops()
    if (lib is not None and x.is_contiguous() and x.dtype == torch.float32 and x.device.type == "cpu"
            and out_dtype in (torch.bfloat16, torch.float32)
            and (delta is None or (delta.dtype == torch.bfloat16 and delta.is_contiguous()))):
        t, d = x.shape
        out = torch.empty(t, d, dtype=out_dtype)
        bf = out_dtype == torch.bfloat16
        lib.ember_add_rmsnorm(x.data_ptr(), _p(delta), _p(post_weight), weight.data_ptr(), eps, t, d,
                              _p(out) if bf else None, None if bf else _p(out))
        return out
    if delta is not None:
        if post_weight is not None:
            delta = F.rms_norm(delta.float(), post_weight.shape, post_weight, eps)
        x.add_(delta)
    return F.rms_norm(x.float(), weight.shape, weight, eps).to(out_dtype)


def rope_store(qkv: torch.Tensor, nq: int, nkv: int, cos: torch.Tensor, sin: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
               q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-6
               ) -> None:
    """qkv: [T, nq + 2 nkv, Dh] (in place): optional q/k head norms, RoPE on q and k (cos/sin [T, rd/2] fp32),
    then k and v are written to the head-major caches [nkv, S, Dh] at slots [T]."""
    lib = cpu_ops()
    t, _, dh = qkv.shape
    if (lib is not None and qkv.dtype == k_cache.dtype == torch.bfloat16 and qkv.is_contiguous()
            and qkv.device.type == "cpu" and dh <= 1024 and k_cache.is_contiguous() and v_cache.is_contiguous()):
        cos, sin = cos.contiguous(), sin.contiguous()
        lib.ember_rope_store(qkv.data_ptr(), t, nq, nkv, dh, cos.shape[-1], cos.data_ptr(), sin.data_ptr(),
                             _p(q_norm), _p(k_norm), eps, k_cache.data_ptr(), v_cache.data_ptr(),
                             k_cache.shape[1], slots.data_ptr())
        return
    from ember.layers.rotary import apply_rope

    qk = qkv[:, : nq + nkv]
    if q_norm is not None:
        qk[:, :nq] = F.rms_norm(qk[:, :nq].float(), q_norm.shape, q_norm, eps).to(qkv.dtype)
        qk[:, nq:] = F.rms_norm(qk[:, nq:].float(), k_norm.shape, k_norm, eps).to(qkv.dtype)
    qk.copy_(apply_rope(qk, cos.to(qkv.dtype), sin.to(qkv.dtype)))
    k_cache.index_copy_(1, slots, qkv[:, nq : nq + nkv].transpose(0, 1))
    v_cache.index_copy_(1, slots, qkv[:, nq + nkv :].transpose(0, 1))


def act_mul(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """gate_up: [T, 2I] -> act(gate) * up: [T, I]."""
    lib = cpu_ops()
    t, i2 = gate_up.shape
    if lib is not None and gate_up.dtype == torch.bfloat16 and gate_up.is_contiguous() and gate_up.device.type == "cpu":
        out = torch.empty(t, i2 // 2, dtype=torch.bfloat16)
        lib.ember_act_mul(gate_up.data_ptr(), out.data_ptr(), t, i2 // 2, ACTS[act])
        return out
    gate, up = gate_up.split(i2 // 2, dim=-1)
    return (F.silu(gate) if act == "silu" else F.gelu(gate, approximate="tanh")) * up


def decode_attention_ok(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    h, dh, hkv = q.shape[1], q.shape[2], k_cache.shape[0]
    return (cpu_ops() is not None and q.device.type == "cpu" and q.dtype == k_cache.dtype == torch.bfloat16
            and q.stride(2) == 1 and q.stride(1) == dh and dh <= 256 and h // hkv <= 16)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     lens: torch.Tensor, scale: float, window: int | None, softcap: float | None,
                     table_of: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of query rows over the paged cache. q: [B, H, Dh] (rows may be strided), caches [Hkv, S, Dh],
    slots [N, C] int64 padded slot tables, lens [B] int64 keys each row sees (its position + 1), table_of [B]
    int64 the table of each row (None: row i reads table i) -> [B, H, Dh]. Call only when decode_attention_ok()."""
    b, h, dh = q.shape
    out = torch.empty(b, h, dh, dtype=q.dtype)
    slots, lens = slots.contiguous(), lens.contiguous()
    tab = None if table_of is None else table_of.contiguous()
    cpu_ops().ember_decode_attention(  # type: ignore[union-attr]
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[1], slots.data_ptr(),
        None if tab is None else tab.data_ptr(), lens.data_ptr(), slots.shape[1], b, h, k_cache.shape[0], dh,
        scale, window or 0, softcap or 0.0, out.data_ptr())
    return out


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """x: [B, V] -> indices [B, k] of each row's k largest values, largest first (as torch.topk)."""
    lib = cpu_ops()
    b, n = x.shape
    if lib is not None and x.dtype == torch.float32 and x.is_contiguous() and x.device.type == "cpu" and k <= n:
        vals, idx = torch.empty(b, k), torch.empty(b, k, dtype=torch.int64)
        if lib.ember_topk_rows(x.data_ptr(), b, n, k, vals.data_ptr(), idx.data_ptr()):
            return idx
    return x.topk(k, dim=-1).indices  # NaN rows, other dtypes and devices


def mask_rows(x: torch.Tensor, rows: torch.Tensor, bits: torch.Tensor) -> None:
    """In place: x[rows[r], t] = -inf where bit t of bits[r] is 0. x: [B, V] fp32; rows: [R] int64;
    bits: [R, W] int32, bit t % 32 of word t // 32 (llguidance's token bitmask)."""
    lib = cpu_ops()
    if lib is not None and x.dtype == torch.float32 and x.is_contiguous() and x.device.type == "cpu" \
            and rows.device.type == "cpu" and bits.device.type == "cpu":
        rows, bits = rows.contiguous(), bits.contiguous()
        lib.ember_mask_rows(x.data_ptr(), x.shape[1], rows.data_ptr(), rows.numel(), bits.data_ptr(), bits.shape[1])
        return
    from ember.structured.backend import unpack

    ok = unpack(bits.to(x.device), x.shape[1])  # [R, V]
    rows = rows.to(x.device)
    x[rows] = x[rows].masked_fill(~ok, float("-inf"))


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x: [B, V] -> [B] int64, the first index of each row's maximum (as torch.argmax)."""
    lib = cpu_ops()
    if lib is not None and x.dtype == torch.float32 and x.is_contiguous() and x.device.type == "cpu" and x.dim() == 2:
        idx = torch.empty(x.shape[0], dtype=torch.int64)
        if lib.ember_argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], idx.data_ptr()):
            return idx
    return x.argmax(dim=-1)
