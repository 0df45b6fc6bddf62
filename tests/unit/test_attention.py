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


def test_decoding_rows_do_not_depend_on_a_prefilling_neighbour(cpu_backend):
    """In a step that mixes a decode with another sequence's prefill, the decode row is computed by the
    same code as in a pure decode step: bit-identical (batched output equals single output)."""
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


def _decode_ctx(tables: list[torch.Tensor], kc, vc) -> ForwardContext:
    t = len(tables)
    return ForwardContext(positions=torch.zeros(t, dtype=torch.long), slot_mapping=torch.zeros(t, dtype=torch.long),
                          seqs=[SeqSpan(i, 1, len(s), s) for i, s in enumerate(tables)], k_cache=[kc], v_cache=[vc],
                          decode_slots=torch.nn.utils.rnn.pad_sequence(tables, batch_first=True),
                          decode_lens=torch.tensor([len(s) for s in tables]))


@pytest.mark.parametrize("window,softcap,alibi", [(None, None, False), (7, None, False), (None, 2.0, False),
                                                  (None, None, True), (3, 1.5, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_without_kernels_matches_dense_and_ignores_its_neighbours(monkeypatch, window, softcap, alibi, dtype):
    """Without ember's kernel (CUDA, NPU, no compiler) each decoding sequence attends over its own gathered
    keys: each row must match a dense reference and be bit-identical to the row computed alone. (One SDPA
    over a padded batch would be fewer calls, but its rows change in the last bits with the padding.)"""
    from ember.kernels import ops
    from ember.layers.attention import attend

    monkeypatch.setattr(ops, "cpu_ops", lambda: None)
    g = torch.Generator().manual_seed(2)
    h, hkv, dh = 6, 2, 16
    kc, vc = (torch.randn(hkv, 256, dh, generator=g).to(dtype) for _ in range(2))
    tables = [torch.randperm(256, generator=g)[:n] for n in (1, 5, 40, 17)]  # scattered slots, ragged lengths
    q = torch.randn(len(tables), h, dh, generator=g).to(dtype)
    slopes = torch.rand(h, generator=g) if alibi else None
    kw = dict(window=window, softcap=softcap, alibi=slopes)
    batch = attend(q, q[:, :hkv], q[:, :hkv], 0, _decode_ctx(tables, kc, vc), 0.25, **kw)
    for i, slots in enumerate(tables):
        alone = attend(q[i : i + 1], q[:1, :hkv], q[:1, :hkv], 0, _decode_ctx([slots], kc, vc), 0.25, **kw)
        assert torch.equal(batch[i : i + 1], alone)
        n = len(slots)
        pos = torch.arange(n)
        keep = pos > n - 1 - window if window else pos >= 0
        ks, vs = (c[:, slots[keep]].float().repeat_interleave(h // hkv, 0) for c in (kc, vc))  # [H, m, Dh]
        sc = torch.einsum("hd,hmd->hm", q[i].float(), ks) * 0.25
        if softcap:
            sc = softcap * torch.tanh(sc / softcap)
        if alibi:
            sc = sc + slopes[:, None] * pos[keep].float()
        want = torch.einsum("hm,hmd->hd", sc.softmax(-1), vs)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(batch[i].float(), want, atol=tol, rtol=tol)
