"""Paged KV cache owned by the engine: fixed-size blocks in one pool per layer, handed out per request.

Prefix reuse (hash chain over full blocks) and reference counts build on this block manager.
"""

from __future__ import annotations

import torch

from ember.config import ModelConfig
from ember.errors import ParameterError


class KVCache:
    def __init__(self, cfg: ModelConfig, memory_bytes: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
        self.block_size = block_size
        self.num_blocks = memory_bytes // (per_token * block_size)
        if self.num_blocks < 2:
            raise ParameterError(
                f"kv_cache_memory={memory_bytes:,} bytes holds fewer than 2 blocks of {block_size} tokens "
                f"({per_token * block_size:,} bytes each); give the KV cache more memory")
        slots = self.num_blocks * block_size
        shape = (cfg.num_kv_heads, slots, cfg.head_dim)  # head-major, see layers/attention.py
        # empty, not zeros: a slot is only read after it was written, and untouched pages cost no RAM
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.bytes = per_token * slots
        self._free = list(range(self.num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"KV cache: {n} blocks asked for, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        blocks.clear()

    def slots(self, block_table: list[int], start: int, end: int, device: torch.device) -> torch.Tensor:
        """Flat cache slots of token positions [start, end) of a request: [end - start] long."""
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(device)
