"""Token embedding, kept as block codes when the checkpoint is block-quantized (rows decoded on lookup)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ember.quant.gguf_blocks import GROUP, GROUP32_KINDS, decode
from ember.weights.base import RawTensor


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.dim = num_embeddings, dim
        self.weight = nn.Parameter(torch.empty(0), requires_grad=False)  # dense table, or empty when packed
        self.codes: torch.Tensor | None = None  # [V, D] uint8 when packed
        self.scale: torch.Tensor | None = None  # [V, D / 32]
        self.offset: torch.Tensor | None = None
        self.out_dtype = torch.float32
        self.rows: Callable[[torch.Tensor], torch.Tensor] | None = None  # set when reading a tied packed head

    def read_from(self, rows: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype) -> None:
        """Instead of `load`: look rows up through `rows` (a tied head's packed weights), no table of its own."""
        self.rows, self.out_dtype = rows, dtype

    def load(self, raw: RawTensor, dtype: torch.dtype, device: torch.device, packed: bool,
             compact: bool = True) -> None:
        """packed: keep block codes (the matmul's tiles, with its `compact` layouts, or 1 byte per weight +
        per-group scale/offset) instead of a dense table."""
        self.out_dtype = dtype
        if packed and self._load_tiles(raw, device, compact):
            return
        if packed and raw.kind in GROUP32_KINDS and self.dim % GROUP == 0:
            c = decode(raw.kind, raw.data, (self.num_embeddings, self.dim))
            self.codes, self.scale, self.offset = c.q.to(device), c.scale.to(device), c.offset.to(device)
            self.weight = nn.Parameter(torch.empty(0, device=device), requires_grad=False)
        else:
            self.weight = nn.Parameter(raw.dequantize(torch.float32).to(dtype).to(device), requires_grad=False)

    def _load_tiles(self, raw: RawTensor, device: torch.device, compact: bool) -> bool:
        """The table in ember's packed tiles (as a packed linear holds it: ~4.6 bits a weight for Q4_K, not a byte
        per code), rows read back exactly as gguf-py dequantizes them; False where the kernels cannot."""
        from ember.quant import packed

        table = nn.Module()
        if not packed.packed_ok([raw], torch.bfloat16, device) or not packed.pack_raw(table, [raw], None, compact):
            return False
        self.table = table  # a submodule: its tensors count as the model's
        self.rows = partial(packed.rows_f32, table)
        self.weight = nn.Parameter(torch.empty(0, device=device), requires_grad=False)
        return True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            return self.rows(ids)  # [T, D] fp32
        if self.codes is None:
            return F.embedding(ids, self.weight).float()  # ids: [T] -> [T, D]; the residual stream is fp32
        t = ids.shape[0]
        q = self.codes[ids].view(t, -1, GROUP).float()  # [T, D/32, 32]
        rows = q * self.scale[ids][..., None] + self.offset[ids][..., None]
        return rows.view(t, self.dim)  # fp32 residual stream
