"""Reference helpers shared by the model tests (transformers is the oracle)."""

from __future__ import annotations

import torch


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding with a fresh full forward per token: no cache, no EOS handling."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]
