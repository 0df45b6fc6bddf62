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


def _step_ctx(spans: list[tuple[int, int]], tables: list[torch.Tensor], kc, vc
              ) -> tuple[ForwardContext, torch.Tensor, torch.Tensor]:
    """A step computing positions [a, b) of each sequence, whose slots (all of them) are `tables[i]`, as the
    runner describes it; the keys of every position are in the cache already (as rope_store leaves them), and
    the step's own k/v [T, Hkv, Dh] are read back from there."""
    seqs, pos, new, row = [], [], [], 0
    for (a, b), slots in zip(spans, tables, strict=True):
        seqs.append(SeqSpan(row, b - a, b, None if a == 0 else slots[:b]))
        pos.append(torch.arange(a, b))
        new.append(slots[a:b])
        row += b - a
    mapping = torch.cat(new)
    ctx = ForwardContext(positions=torch.cat(pos), slot_mapping=mapping, seqs=seqs, k_cache=[kc], v_cache=[vc])
    return ctx, kc[:, mapping].transpose(0, 1), vc[:, mapping].transpose(0, 1)


def _decode_ctx(tables: list[torch.Tensor], kc, vc) -> ForwardContext:
    """Each sequence decodes its last position, reading every key from the cache (a 1-token one too)."""
    ctx = _step_ctx([(len(s) - 1, len(s)) for s in tables], tables, kc, vc)[0]
    ctx.seqs = [SeqSpan(i, 1, len(s), s) for i, s in enumerate(tables)]
    return ctx


def test_rows_are_the_same_bits_however_the_prompt_is_split(cpu_backend):
    """The row kernel (bf16, ember's kernels) computes every query row the same way: a prompt all at once, in
    chunks, after a cached prefix, one row at a time, or beside another sequence gives bit-identical rows.
    Without the kernels (SDPA), rows agree to rounding."""
    from ember.layers.attention import attend

    bf = torch.bfloat16
    g = torch.Generator().manual_seed(1)
    n = 300  # more than two of the kernel's key chunks
    kc, vc = torch.randn(HKV, 512, DH, generator=g).to(bf), torch.randn(HKV, 512, DH, generator=g).to(bf)
    slots = torch.randperm(512, generator=g)[:n]
    other = torch.randperm(512, generator=g)[:40]
    q = torch.randn(n, H, DH, generator=g).to(bf)

    def run(cuts: list[int], neighbour: bool = False) -> torch.Tensor:
        outs = []
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            spans, tables, qs = [(a, b)], [slots], [q[a:b]]
            if neighbour:  # another sequence decoding its 40th token in the same step
                spans, tables, qs = spans + [(39, 40)], tables + [other], qs + [q[:1]]
            ctx, k, v = _step_ctx(spans, tables, kc, vc)
            outs.append(attend(torch.cat(qs), k, v, 0, ctx, 0.3)[: b - a])
        return torch.cat(outs)

    whole = run([0, n])
    for cuts, neighbour in (([0, 128, 256, n], False), ([0, 17, 100, 299, n], True), ([0, 256, n], True),
                            (list(range(0, n + 1, 50)), False)):
        split = run(cuts, neighbour)
        if cpu_backend == "kernels":
            assert torch.equal(split, whole), cuts
        else:
            torch.testing.assert_close(split.float(), whole.float(), atol=2e-2, rtol=2e-2)
    if cpu_backend == "kernels":  # and the same as the decode of that position
        assert torch.equal(run([n - 1, n]), whole[-1:])


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
