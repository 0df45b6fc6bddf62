"""Gated MLP: down(act(gate(x)) * up(x)), with gate and up fused into one matmul."""

from __future__ import annotations

import torch
from torch import nn

from ember.kernels import ops
from ember.layers.linear import Linear


class GatedMLP(nn.Module):
    """SwiGLU (Llama: "silu") or GeGLU (Gemma: "gelu_tanh"), chosen by `act`."""

    def __init__(self, hidden: int, inter: int, act: str) -> None:
        super().__init__()
        assert act in ops.ACTS, act
        self.inter, self.act = inter, act
        self.gate_up_proj = Linear(hidden, [inter, inter], shards=("gate", "up"))
        self.down_proj = Linear(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2I]
        return self.down_proj(ops.act_mul(gate_up, self.act))  # [T, I] -> [T, D]
