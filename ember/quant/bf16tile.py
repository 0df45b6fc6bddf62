"""F16 / BF16 / F32 weights in bf16 on ember's own matmul (kernels/csrc/bf16tile.c, AVX512-BF16).

The weights are kept bf16 (half the size of fp32, the checkpoint's own size for F16 / BF16), in tiles of 16
rows with pairs of k as the vector lanes' operands. The kernel serves every row count, with a fixed
summation order per output element: a sequence's numbers do not depend on its batch, on how its prompt was
chunked or on a cached prefix (torch's bf16 linear picks different kernels per shape). One row streams the
weights at ~2x the speed of torch's bf16 linear here; 64 rows run at 1.1x, 512 at ~0.9x of oneDNN's.
CPUs without AVX512-BF16 keep the dense method (torch).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ember.kernels import cpu_ops
from ember.quant.base import QuantMethod, kernel_apply, row_chunks
from ember.weights.base import RawTensor

TILE = 16
FLOAT_KINDS = ("F16", "BF16", "F32")
CHUNK = 1 << 25  # weights per bf16 chunk while packing (64 MiB)


def available() -> bool:
    lib = cpu_ops()
    return lib is not None and bool(lib.ember_bf16_available()) and os.environ.get("EMBER_BF16_TILES", "1") != "0"


def bf16_ok(shards: list[RawTensor], dtype: torch.dtype, device: torch.device) -> bool:
    """Float weights in a bf16 model on the CPU, with k a multiple of 4 (the kernel's two chains of k pairs)."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and available()
            and all(s.kind in FLOAT_KINDS and len(s.shape) == 2 and s.shape[1] % 4 == 0 for s in shards))


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """w bf16 [N, K] -> tiles [ceil(N/16), K/2, 16, 2] bf16 (missing rows of the last tile are zeros)."""
    n, k = w.shape
    w = w.contiguous()
    tiles = torch.empty(-(-n // TILE), k // 2, TILE, 2, dtype=torch.bfloat16)
    cpu_ops().ember_bf16_pack(w.data_ptr(), n, k, tiles.data_ptr())  # type: ignore[union-attr]
    return tiles


def matmul(tiles: torch.Tensor, x: torch.Tensor, n: int, out_dtype: torch.dtype) -> torch.Tensor:
    """x [M, K] bf16 or fp32, contiguous -> x @ W.T [M, N] in out_dtype (bf16 or fp32)."""
    m, k = x.shape
    y = torch.empty(m, n, dtype=out_dtype)
    f32 = out_dtype == torch.float32
    cpu_ops().ember_bf16_matmul(tiles.data_ptr(), x.data_ptr(), int(x.dtype == torch.float32), m, n, k,  # type: ignore[union-attr]
                                y.data_ptr() if f32 else None, None if f32 else y.data_ptr())
    return y


def rows_f32(layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Weight rows `ids` [n] (any order) in fp32 [n, K]: a tied embedding reads the head's tiles."""
    ids = ids.to(torch.int64).contiguous()
    k = layer.tiles.shape[1] * 2
    out = torch.empty(ids.shape[0], k)
    cpu_ops().ember_bf16_rows_f32(layer.tiles.data_ptr(), ids.data_ptr(), ids.shape[0], k, out.data_ptr())  # type: ignore[union-attr]
    return out


class Bf16TileMethod(QuantMethod):
    """Float checkpoint weights as bf16 tiles on ember's vdpbf16ps kernel."""

    name = "bf16-tiles"

    def pack(self, layer: nn.Module, shards: list[RawTensor], bias: torch.Tensor | None,
             dtype: torch.dtype, device: torch.device) -> None:
        n, k = sum(s.shape[0] for s in shards), shards[0].shape[1]
        if any(s.shape[0] % TILE for s in shards[:-1]):  # a shard ends inside a tile: pack the fused weight whole
            tiles = pack_weight(torch.cat([s.dequantize(torch.bfloat16) for s in shards]))
        else:  # a bounded chunk of rows in bf16 at a time beside the tiles (a 128k-vocabulary head: 64 MiB, not 0.5 GB)
            tiles = torch.empty(-(-n // TILE), k // 2, TILE, 2, dtype=torch.bfloat16)
            row = 0
            for w in row_chunks(shards, CHUNK, torch.bfloat16, TILE):  # [rows, K], each from a tile's first row
                w = w.contiguous()
                cpu_ops().ember_bf16_pack(w.data_ptr(), w.shape[0], k, tiles[row // TILE].data_ptr())  # type: ignore[union-attr]
                row += w.shape[0]
        layer.tiles = nn.Parameter(tiles, requires_grad=False)
        layer.n_out = n
        layer.bias = None if bias is None else nn.Parameter(bias.to(torch.bfloat16), requires_grad=False)

    rows_f32 = staticmethod(rows_f32)  # a tied embedding reads the head's tiles

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return kernel_apply(layer, x, lambda rows, out_dtype: matmul(layer.tiles, rows, layer.n_out, out_dtype))
