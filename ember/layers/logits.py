"""Exact top candidates for a packed output head.

The int4 kernel returns bf16, whose step is 0.125 at logit magnitudes of 16-32: near-ties between
the top tokens get decided by rounding (SmolLM2 answers "L'Étoile" instead of "The capital ... is
Paris"). So the head runs the fast packed pass over the vocabulary, then recomputes the best few
candidates in fp32 from the block codes: greedy picks and top logprobs are then those of an fp32 head.
"""

from __future__ import annotations

import torch
from torch import nn

from ember.quant.gguf_blocks import GROUP, Canonical


class TopRefiner(nn.Module):
    def __init__(self, codes: Canonical, k: int = 16) -> None:
        super().__init__()
        self.k = k
        self.register_buffer("q", codes.q, persistent=False)  # [V, D] uint8 (shared with the embedding)
        self.register_buffer("scale", codes.scale, persistent=False)  # [V, D/32]
        self.register_buffer("offset", codes.offset, persistent=False)

    def forward(self, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """logits: [B, V] fp32 approximations; hidden: [B, D] fp32 -> logits with the top k exact."""
        b, d = hidden.shape
        idx = logits.topk(min(self.k, logits.shape[-1]), dim=-1).indices  # [B, k]
        rows = self.q[idx].view(b, -1, d // GROUP, GROUP).float()  # [B, k, D/32, 32]
        w = rows * self.scale[idx][..., None] + self.offset[idx][..., None]  # same order as the dequantizer
        exact = torch.einsum("bkd,bd->bk", w.view(b, -1, d), hidden.float())  # [B, k]
        return logits.scatter(1, idx, exact)
