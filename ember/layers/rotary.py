"""Rotary position embedding (rotate-half layout), with Llama-3 and linear frequency scaling."""

from __future__ import annotations

import math
from typing import Any

import torch


def rope_inv_freq(rope_dim: int, theta: float, scaling: dict[str, Any] | None,
                  freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse frequencies [rope_dim / 2] in fp32."""
    # base frequencies in fp32, as transformers computes them: a float64 table differs by an ulp, which at
    # position ~800 turns the angle by ~1e-4 rad and moves the logits by ~1e-3 (scaling below is float64)
    inv = (1.0 / theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim)).double()
    kind = (scaling or {}).get("type")
    if kind == "linear":
        inv = inv / float(scaling["factor"])  # type: ignore[index]
    elif kind == "freq_factors":
        # GGUF Llama-3.1: the converter stored the per-frequency divisors as a tensor
        assert freq_factors is not None, "rope_freqs.weight is missing"
        inv = inv / freq_factors.to(torch.float64)
    elif kind == "llama3":
        inv = _llama3(inv, scaling)  # type: ignore[arg-type]
    return inv.float()


def _llama3(inv: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)  # long wavelengths: divide by factor
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [T, rope_dim / 2] for positions [T]; computed once per step, shared by all layers."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, rd/2]
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, Dh]; rotates the first 2 * cos.shape[-1] dims of each head (partial rotary allowed)."""
    half = cos.shape[-1]
    c, s = cos[:, None, :], sin[:, None, :]  # [T, 1, rd/2]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, rest), dim=-1)
