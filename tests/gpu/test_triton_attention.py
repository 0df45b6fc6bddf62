"""The Triton paged attention kernel against a plain-torch reference over the same paged cache: mixed
prefill + decode batches, GQA, windows, soft-caps, ALiBi, split-KV decode, in fp32 and fp16 (bf16 only on a
GPU: the interpreter's bf16 tl.dot is wrong upstream)."""

from __future__ import annotations

import pytest
import torch

from ember.kernels.triton.attention import attention

BS = 16  # tokens per cache block


def _reference(q, kc, vc, tables, q_lens, ctx_lens, scale, window, softcap, alibi):
    """q: [T, H, Dh] -> [T, H, Dh] in fp32, one sequence at a time, keys gathered through the block tables."""
    h, hkv = q.shape[1], kc.shape[0]
    outs, row = [], 0
    for s, (n, c) in enumerate(zip(q_lens, ctx_lens, strict=True)):
        pos = torch.arange(c)
        slots = tables[s][pos // BS].long() * BS + pos % BS
        k = kc[:, slots].float().repeat_interleave(h // hkv, 0)  # [H, c, Dh]
        v = vc[:, slots].float().repeat_interleave(h // hkv, 0)
        qs = q[row : row + n].float().transpose(0, 1)  # [H, n, Dh]
        sc = qs @ k.transpose(1, 2) * scale  # [H, n, c]
        if softcap is not None:
            sc = softcap * torch.tanh(sc / softcap)
        if alibi is not None:
            sc = sc + alibi.float()[:, None, None] * pos.float()[None, None, :]
        qp = torch.arange(c - n, c)[:, None]
        keep = pos[None, :] <= qp
        if window is not None:
            keep &= pos[None, :] > qp - window
        outs.append((sc.masked_fill(~keep, float("-inf")).softmax(-1) @ v).transpose(0, 1))
        row += n
    return torch.cat(outs)


def _batch(q_lens, ctx_lens, h, hkv, dh, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    nblocks = sum(-(-c // BS) for c in ctx_lens) + 3
    perm = torch.randperm(nblocks, generator=g)  # scattered blocks: tables are not contiguous
    width = max(-(-c // BS) for c in ctx_lens)
    tables = torch.zeros(len(ctx_lens), width, dtype=torch.int32)
    used = 0
    for s, c in enumerate(ctx_lens):
        nb = -(-c // BS)
        tables[s, :nb] = perm[used : used + nb].int()
        used += nb
    kc = torch.randn(hkv, nblocks * BS, dh, generator=g).to(dtype)
    vc = torch.randn(hkv, nblocks * BS, dh, generator=g).to(dtype)
    q = torch.randn(sum(q_lens), h, dh, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return [t.to(device) for t in (q, kc, vc, tables, cu, torch.tensor(ctx_lens, dtype=torch.int32))]


# a fresh prompt, a chunk after a cached prefix, decode rows, a 1-token context: one batch
Q_LENS, CTX_LENS = [7, 20, 1, 1, 1], [7, 45, 33, 1, 70]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("h,hkv,dh", [(4, 2, 16), (6, 1, 24), (8, 8, 32)])  # GQA, MQA with 6 (not 2^k), MHA
def test_mixed_batch_matches_reference(dtype, h, hkv, dh, device):
    q, kc, vc, tables, cu, lens = _batch(Q_LENS, CTX_LENS, h, hkv, dh, dtype, device)
    got = attention(q, kc, vc, tables, cu, lens, BS, 0.25)
    want = _reference(q.cpu(), kc.cpu(), vc.cpu(), tables.cpu(), Q_LENS, CTX_LENS, 0.25, None, None, None)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float().cpu(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("window,softcap,alibi", [(5, None, False), (40, 30.0, False), (None, None, True),
                                                  (None, 2.0, False)])
def test_window_softcap_alibi(window, softcap, alibi, device):
    q, kc, vc, tables, cu, lens = _batch(Q_LENS, CTX_LENS, 4, 2, 16, torch.float32, device, seed=1)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=device) if alibi else None
    got = attention(q, kc, vc, tables, cu, lens, BS, 0.5, window=window, softcap=softcap, alibi=slopes)
    want = _reference(q.cpu(), kc.cpu(), vc.cpu(), tables.cpu(), Q_LENS, CTX_LENS, 0.5, window, softcap,
                      None if slopes is None else slopes.cpu())
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("segments", [2, 8])
def test_split_kv_equals_one_pass(segments, device):
    """Decode rows over long contexts, keys split in segments and merged: the one-pass result to rounding
    (a segment can be empty: context 1 with 8 segments)."""
    q_lens, ctx_lens = [1, 1, 1, 3], [300, 1, 129, 64]
    q, kc, vc, tables, cu, lens = _batch(q_lens, ctx_lens, 4, 2, 16, torch.float32, device, seed=2)
    one = attention(q, kc, vc, tables, cu, lens, BS, 0.3, window=100)
    split = attention(q, kc, vc, tables, cu, lens, BS, 0.3, window=100, segments=segments)
    want = _reference(q.cpu(), kc.cpu(), vc.cpu(), tables.cpu(), q_lens, ctx_lens, 0.3, 100, None, None)
    torch.testing.assert_close(split.cpu(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split, one, atol=1e-5, rtol=1e-5)


def test_padded_rows_write_zeros_not_nans(device):
    """A CUDA-graph bucket pads the batch with sequences of context 0: their rows come out finite (zero)."""
    q, kc, vc, tables, cu, lens = _batch([1, 1], [20, 9], 4, 2, 16, torch.float32, device)
    lens[1] = 0
    got = attention(q, kc, vc, tables, cu, lens, BS, 0.3)
    assert torch.isfinite(got).all() and not got[1].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_long_prompt_chunks_take_64_row_tiles(dtype, device):
    """max_q_len >= 64 switches to 64-row tiles (32 queries x 2 heads here): same results, decode rows beside."""
    from ember.kernels.triton.attention import tile_rows

    assert tile_rows(4, 2, 16, 100) == (32, 64) and tile_rows(4, 2, 16, 1) == (8, 16)
    assert tile_rows(8, 1, 256, 100) == (2, 16)  # wide heads keep 16 rows
    q_lens, ctx_lens = [100, 1, 70], [100, 50, 90]
    q, kc, vc, tables, cu, lens = _batch(q_lens, ctx_lens, 4, 2, 16, dtype, device, seed=3)
    got = attention(q, kc, vc, tables, cu, lens, BS, 0.25, window=33, max_q_len=100)
    want = _reference(q.cpu(), kc.cpu(), vc.cpu(), tables.cpu(), q_lens, ctx_lens, 0.25, 33, None, None)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float().cpu(), want, atol=tol, rtol=tol)
