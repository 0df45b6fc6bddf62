"""RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
