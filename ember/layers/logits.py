"""Exact top candidates for a packed output head.

The int4 kernel returns bf16, whose step is 0.125 at logit magnitudes of 16-32: near-ties between
the top tokens get decided by rounding (SmolLM2 answers "L'Étoile" instead of "The capital ... is
Paris"). So the head runs the fast packed pass over the vocabulary, then recomputes the best few
candidates in fp32 from the block codes: greedy picks and top logprobs are then those of an fp32 head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ember.kernels import ops
from ember.quant.gguf_blocks import GROUP, Canonical

Rows = Callable[[torch.Tensor], torch.Tensor]  # row ids [n] -> fp32 weight rows [n, D]
Allowed = tuple[torch.Tensor, torch.Tensor] | None  # structured-output rows [R], their token bitmasks [R, W]


def canonical_rows(codes: Canonical) -> Rows:
    """Rows decoded from canonical block codes, in the dequantizer's order (q * scale, then + offset)."""

    def rows(ids: torch.Tensor) -> torch.Tensor:
        n, d = ids.shape[0], codes.q.shape[1]
        q = codes.q[ids].view(n, d // GROUP, GROUP).float()  # [n, D/32, 32]
        return (q * codes.scale[ids][..., None] + codes.offset[ids][..., None]).view(n, d)

    return rows


def head_logits(head: nn.Module, hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """hidden [B, D] fp32 -> logits [B, V] fp32. A head on ember's packed kernel (`out_f32`, set by the loader)
    takes the fp32 hidden state and returns fp32, with no bf16 rounding of either; others run in `dtype`."""
    if getattr(head, "out_f32", False):
        return head(hidden)
    return head(hidden.to(dtype)).float()


class TopRefiner(nn.Module):
    """rows: exact fp32 head rows by id (from the packed head itself, or from canonical codes)."""

    def __init__(self, rows: Rows, k: int = 16) -> None:
        super().__init__()
        self.k, self.rows = k, rows

    def forward(self, logits: torch.Tensor, hidden: torch.Tensor, allowed: Allowed = None) -> torch.Tensor:
        """logits: [B, V] fp32 approximations; hidden: [B, D] fp32 -> logits with the top k exact. A row under a
        structured-output constraint takes its candidates among its allowed tokens (`allowed`)."""
        b, d = hidden.shape
        pick = logits
        if allowed is not None:  # other rows rank the same values as without a constrained neighbour
            pick = logits.clone()
            ops.mask_rows(pick, *allowed)
        idx = ops.topk_indices(pick, min(self.k, logits.shape[-1]))  # [B, k]
        w = self.rows(idx.reshape(-1)).view(b, -1, d)  # [B, k, D]
        # a product and a sum over D per candidate: the same loop whatever B is (a batched matmul's blocking
        # moves the last bits with the number of rows, and then a row's logits would depend on its neighbours)
        exact = (w * hidden.float()[:, None, :]).sum(-1)  # [B, k]
        return logits.scatter_(1, idx, exact)  # in place: a copy of [B, V] costs more than the refinement
