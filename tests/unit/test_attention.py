"""Paged attention (prefill, chunked prefill over the cache, decode) against a dense hand-written
reference, with and without a sliding window and logit soft-capping."""

from __future__ import annotations

import pytest
import torch

from ember.layers.attention import ForwardContext, SeqSpan, paged_attention

L, H, HKV, DH = 20, 4, 2, 8


def _dense(q, k, v, scale, window, softcap):
    """q: [L, H, Dh], k/v: [L, Hkv, Dh] -> [L, H, Dh], every query seeing keys (i - window, i]."""
    rep = H // HKV
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("ihd,jhd->hij", q, k) * scale  # [H, L, L]
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    keep = (j <= i) & ((j > i - window) if window is not None else True)
    s = s.masked_fill(~keep, float("-inf"))
    return torch.einsum("hij,jhd->ihd", s.softmax(-1), v)


@pytest.mark.parametrize("window", [None, 1, 5, 64])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_paged_matches_dense(window, softcap):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(L, n, DH, generator=g) for n in (H, HKV, HKV))
    want = _dense(q, k, v, 0.3, window, softcap)
    cache = ([torch.zeros(HKV, 64, DH)], [torch.zeros(HKV, 64, DH)])
    slots = torch.randperm(64, generator=g)[:L]  # paged: positions land on scattered slots
    # prefill of 7 (fresh k/v), a chunk of 8 over the cache, then 5 single-token decode steps
    steps = [(0, 7), (7, 15)] + [(p, p + 1) for p in range(15, L)]
    outs = []
    for a, b in steps:
        ctx = ForwardContext(positions=torch.arange(a, b), slot_mapping=slots[a:b],
                             seqs=[SeqSpan(0, b - a, b, None if a == 0 else slots[:b])],
                             k_cache=cache[0], v_cache=cache[1])
        outs.append(paged_attention(q[a:b], k[a:b], v[a:b], 0, ctx, 0.3, window=window, softcap=softcap))
    assert torch.allclose(torch.cat(outs), want, atol=1e-5)
