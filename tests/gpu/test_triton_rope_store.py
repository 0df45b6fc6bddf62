"""The Triton RoPE + norm + cache-store kernel against ember's plain-torch path (ops.rope_store without the C
kernels): q and k rotated in place, k and v in their slots, padding rows (slot -1) leaving the cache alone."""

from __future__ import annotations

import pytest
import torch

from ember.kernels import ops
from ember.kernels.triton.rope_store import rope_store
from ember.layers.rotary import rope_cos_sin, rope_inv_freq

T, NQ, NKV = 5, 4, 2


def _inputs(dh, rd, dtype, device, norm, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, NQ + 2 * NKV, dh, generator=g).to(dtype)
    cos, sin = rope_cos_sin(torch.tensor([0, 3, 4, 9, 100]), rope_inv_freq(rd, 10000.0, None), torch.float32)
    kc, vc = torch.zeros(NKV, 32, dh, dtype=dtype), torch.zeros(NKV, 32, dh, dtype=dtype)
    slots = torch.tensor([3, 17, 0, 31, 8])
    qn = kn = None
    if norm:
        qn, kn = torch.rand(dh, generator=g) + 0.5, torch.rand(dh, generator=g) + 0.5
    return [None if x is None else x.to(device) for x in (qkv, cos, sin, kc, vc, slots, qn, kn)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dh,rd,norm", [(16, 16, False), (24, 8, True), (32, 32, True)])  # partial rotary
def test_matches_torch_path(dtype, dh, rd, norm, device, monkeypatch):
    qkv, cos, sin, kc, vc, slots, qn, kn = _inputs(dh, rd, dtype, device, norm)
    ref = [x.cpu().clone() for x in (qkv, kc, vc)]
    monkeypatch.setattr(ops, "cpu_ops", lambda: None)  # the reference: plain torch ops
    ops.rope_store(ref[0], NQ, NKV, cos.cpu(), sin.cpu(), ref[1], ref[2], slots.cpu(),
                   None if qn is None else qn.cpu(), None if kn is None else kn.cpu(), 1e-6)
    rope_store(qkv, NQ, NKV, cos, sin, kc, vc, slots, qn, kn, 1e-6)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for got, want in zip((qkv, kc, vc), ref, strict=True):
        torch.testing.assert_close(got.cpu(), want, atol=tol, rtol=tol)
    assert kc[:, slots].abs().sum() > 0


def test_padding_rows_skip_the_cache_and_no_rope_copies(device):
    """slot -1: q/k still rotated in place but nothing lands in the cache; cos=None (ALiBi models): k, v copied."""
    qkv, cos, sin, kc, vc, slots, _, _ = _inputs(16, 16, torch.float32, device, False)
    slots[1] = -1
    orig = qkv.clone()
    rope_store(qkv, NQ, NKV, None, None, kc, vc, slots)
    torch.testing.assert_close(qkv, orig)
    keep = [0, 2, 3, 4]
    torch.testing.assert_close(kc[:, slots[keep]].transpose(0, 1), orig[keep, NQ : NQ + NKV])
    torch.testing.assert_close(vc[:, slots[keep]].transpose(0, 1), orig[keep, NQ + NKV :])
    assert (kc != 0).sum() == len(keep) * NKV * 16  # nothing else written (slot -1 did not wrap to 31)
