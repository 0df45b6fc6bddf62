"""A plain-torch reference for paged attention and random paged batches (no pytest: benchmarks/gpu_check.py
imports it on the GPU machine too)."""

from __future__ import annotations

import torch

BS = 16  # tokens per cache block


def reference_attention(q, kc, vc, tables, q_lens, ctx_lens, scale, window, softcap, alibi):
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


def paged_batch(q_lens, ctx_lens, h, hkv, dh, dtype, device, seed=0):
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
