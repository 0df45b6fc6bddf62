"""Gated MLP: down(act(gate(x)) * up(x)), with gate and up fused into one matmul."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ember.layers.linear import Linear


class GatedMLP(nn.Module):
    """SwiGLU (Llama: silu) or GeGLU (Gemma: tanh gelu), chosen by `act`."""

    def __init__(self, hidden: int, inter: int, act: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.inter, self.act = inter, act
        self.gate_up_proj = Linear(hidden, [inter, inter], shards=("gate", "up"))
        self.down_proj = Linear(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)  # [T, I] each
        return self.down_proj(self.act(gate) * up)
