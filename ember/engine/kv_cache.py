"""Paged KV cache owned by the engine: fixed-size blocks in one pool per layer, handed out per request.

Which block holds what, reference counts and prefix reuse live in `BlockPool` (block_pool.py).
"""

from __future__ import annotations

import torch

from ember.config import ModelConfig
from ember.engine.block_pool import BlockPool
from ember.errors import ParameterError


class KVCache:
    def __init__(self, cfg: ModelConfig, memory_bytes: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, prefix_caching: bool = True) -> None:
        per_token = cfg.kv_bytes_per_token(dtype)
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
        self.pool = BlockPool(self.num_blocks, block_size, prefix_caching)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        return self.pool.allocate(n)

    def free(self, blocks: list[int]) -> None:
        self.pool.free(blocks)

    def table_slots(self, tables: list[list[int]], device: torch.device) -> list[torch.Tensor]:
        """Flat cache slots of every position each block table covers: [len(table) * block_size] long per
        table, all views of one tensor built in a few ops (the runner needs them for every request, every step)."""
        bs = self.block_size
        blocks = torch.tensor([b for t in tables for b in t], dtype=torch.long)  # [sum of table lengths]
        flat = (blocks[:, None] * bs + torch.arange(bs)).view(-1).to(device)  # [sum * bs]
        return list(flat.split([len(t) * bs for t in tables]))
