"""The Triton paged attention kernel against a plain-torch reference over the same paged cache: mixed
prefill + decode batches, GQA, windows, soft-caps, ALiBi, split-KV decode, in fp32 and fp16 (bf16 only on a
GPU: the interpreter's bf16 tl.dot is wrong upstream)."""

from __future__ import annotations

import pytest
import torch

from ember.kernels.triton.attention import attention
from tests.gpu.paged_ref import BS, paged_batch, reference_attention

# a fresh prompt, a chunk after a cached prefix, decode rows, a 1-token context: one batch
Q_LENS, CTX_LENS = [7, 20, 1, 1, 1], [7, 45, 33, 1, 70]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("h,hkv,dh", [(4, 2, 16), (6, 1, 24), (8, 8, 32)])  # GQA, MQA with 6 (not 2^k), MHA
def test_mixed_batch_matches_reference(dtype, h, hkv, dh, device):
    q, kc, vc, tables, cu, lens = paged_batch(Q_LENS, CTX_LENS, h, hkv, dh, dtype, device)
    got = attention(q, kc, vc, tables, cu, lens, BS, 0.25)
    want = reference_attention(q.cpu(), kc.cpu(), vc.cpu(), tables.cpu(), Q_LENS, CTX_LENS, 0.25, None, None, None)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float().cpu(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("window,softcap,alibi", [(5, None, False), (40, 30.0, False), (None, None, True),
                                                  (None, 2.0, False)])
def test_window_softcap_alibi(window, softcap, alibi, device):
    q, kc, vc, tables, cu, lens = paged_batch(Q_LENS, CTX_LENS, 4, 2, 16, torch.float32, device, seed=1)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=device) if alibi else None
    got = attention(q, kc, vc, tables, cu, lens, BS, 0.5, window=window, softcap=softcap, alibi=slopes)
    want = reference_attention(q.cpu(), kc.cpu(), vc.cpu(), tables.cpu(), Q_LENS, CTX_LENS, 0.5, window, softcap,
                      None if slopes is None else slopes.cpu())
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("segments", [2, 8])
def test_split_kv_equals_one_pass(segments, device):
    """Decode rows over long contexts, keys split in segments and merged: the one-pass result to rounding
    (a segment can be empty: context 1 with 8 segments)."""
    q_lens, ctx_lens = [1, 1, 1, 3], [300, 1, 129, 64]
    q, kc, vc, tables, cu, lens = paged_batch(q_lens, ctx_lens, 4, 2, 16, torch.float32, device, seed=2)
    one = attention(q, kc, vc, tables, cu, lens, BS, 0.3, window=100)
    split = attention(q, kc, vc, tables, cu, lens, BS, 0.3, window=100, segments=segments)
    want = reference_attention(q.cpu(), kc.cpu(), vc.cpu(), tables.cpu(), q_lens, ctx_lens, 0.3, 100, None, None)
    torch.testing.assert_close(split.cpu(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split, one, atol=1e-5, rtol=1e-5)


def test_padded_rows_write_zeros_not_nans(device):
    """A CUDA-graph bucket pads the batch with sequences of context 0: their rows come out finite (zero)."""
    q, kc, vc, tables, cu, lens = paged_batch([1, 1], [20, 9], 4, 2, 16, torch.float32, device)
    lens[1] = 0
    got = attention(q, kc, vc, tables, cu, lens, BS, 0.3)
    assert torch.isfinite(got).all() and not got[1].any()


def test_long_prompt_chunks_take_64_row_tiles(device):
    """max_q_len >= 64 switches 16-bit inputs to 64-row tiles (32 queries x 2 heads here): same results, decode
    rows beside."""
    from ember.kernels.triton.attention import tile_rows

    assert tile_rows(4, 2, 16, 100) == (32, 64) and tile_rows(4, 2, 16, 1) == (8, 16)
    assert tile_rows(8, 1, 256, 100) == (2, 16) and tile_rows(4, 2, 16, 100, half=False) == (8, 16)
    dtype = torch.float16
    q_lens, ctx_lens = [100, 1, 70], [100, 50, 90]
    q, kc, vc, tables, cu, lens = paged_batch(q_lens, ctx_lens, 4, 2, 16, dtype, device, seed=3)
    got = attention(q, kc, vc, tables, cu, lens, BS, 0.25, window=33, max_q_len=100)
    want = reference_attention(q.cpu(), kc.cpu(), vc.cpu(), tables.cpu(), q_lens, ctx_lens, 0.25, 33, None, None)
    torch.testing.assert_close(got.float().cpu(), want, atol=2e-3, rtol=2e-3)
