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


@pytest.mark.skipif(not __import__("ember.kernels", fromlist=["cpu_ops"]).cpu_ops(), reason="needs ember's kernels")
def test_decoding_rows_do_not_depend_on_a_prefilling_neighbour():
    """In a step that mixes a decode with another sequence's prefill, the decode row is computed by the
    same kernel as in a pure decode step: bit-identical (batched output equals single output)."""
    from ember.layers.attention import attend

    bf = torch.bfloat16
    g = torch.Generator().manual_seed(1)
    kc, vc = torch.randn(HKV, 64, DH, generator=g).to(bf), torch.randn(HKV, 64, DH, generator=g).to(bf)
    dec_slots = torch.arange(0, 12)  # a sequence at position 11 decoding its 12th token
    q1, k1, v1 = (torch.randn(1, n, DH, generator=g).to(bf) for n in (H, HKV, HKV))

    def decode_ctx(seqs, rows, t):
        return ForwardContext(positions=torch.zeros(t, dtype=torch.long), slot_mapping=torch.zeros(t, dtype=torch.long),
                              seqs=seqs, k_cache=[kc], v_cache=[vc], decode_slots=dec_slots[None],
                              decode_lens=torch.tensor([12]), decode_rows=rows)

    alone = attend(q1, k1, v1, 0, decode_ctx([SeqSpan(0, 1, 12, dec_slots)], None, 1), 0.3)
    q2, k2, v2 = (torch.randn(5, n, DH, generator=g).to(bf) for n in (H, HKV, HKV))  # a fresh 5-token prefill
    seqs = [SeqSpan(0, 5, 5, None), SeqSpan(5, 1, 12, dec_slots)]
    mixed = attend(torch.cat([q2, q1]), torch.cat([k2, k1]), torch.cat([v2, v1]), 0,
                   decode_ctx(seqs, torch.tensor([5]), 6), 0.3)
    assert torch.equal(mixed[5:], alone)
    torch.testing.assert_close(mixed[:5].float(), attend(q2, k2, v2, 0, ForwardContext(
        positions=torch.arange(5), slot_mapping=torch.arange(5), seqs=[SeqSpan(0, 5, 5, None)],
        k_cache=[kc], v_cache=[vc]), 0.3).float())
