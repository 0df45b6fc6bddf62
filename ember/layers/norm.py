"""RMSNorm, with the residual add fused in (`add_forward`) for the decoder's pre-norm pattern."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.kernels import ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.out_dtype: torch.dtype | None = None  # matmul input dtype (bf16 for packed int4); None: x's
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        # fp32 statistics keep bf16 activations close to the reference
        y = F.rms_norm(x.float(), self.weight.shape, self.weight, self.eps)
        return y.to(out_dtype or self.out_dtype or x.dtype)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor | None, post: RMSNorm | None = None,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x: [T, D] fp32 residual stream, updated in place with x += delta (first normalized by `post`, a
        sandwich norm, when given); returns this norm of the new x. One fused op on CPU."""
        out = out_dtype or self.out_dtype or x.dtype
        return ops.add_rmsnorm(x, delta, self.weight, self.eps, out, None if post is None else post.weight)
