"""ember's bf16 matmul (csrc/bf16tile.c) for F16 / BF16 / F32 weights: products against a float64 reference of the
same bf16 operands, every row's bits independent of the call's row count, and the tile layout round-tripping."""

from __future__ import annotations

import pytest
import torch

from ember.quant import bf16tile

pytestmark = pytest.mark.skipif(not bf16tile.available(), reason="needs AVX512-BF16 and a C compiler")


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.05).bfloat16()


# n: whole groups of 4 tiles, a partial last group (1-3 tiles), a partial last tile; k: 4 .. 2 chains x many
@pytest.mark.parametrize("n,k", [(64, 128), (37, 64), (80, 96), (16, 4), (200, 1000)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_matmul_equals_the_bf16_product(n, k, x_dtype):
    w = _weight(n, k, n + k)
    tiles = bf16tile.pack_weight(w)
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(1)).to(x_dtype)
    y = bf16tile.matmul(tiles, x, n, torch.float32)
    want = x.bfloat16().double() @ w.double().T  # the kernel's operands: x rounded to bf16 (nearest even)
    tol = 1e-6 * (x.bfloat16().double().abs() @ w.double().abs().T)  # fp32 accumulation over k
    assert (y.double() - want).abs().le(tol + 1e-12).all()
    y16 = bf16tile.matmul(tiles, x, n, torch.bfloat16)
    assert torch.equal(y16, y.bfloat16())  # bf16 output: the fp32 result rounded as torch rounds it


@pytest.mark.parametrize("m", [1, 2, 3, 5, 64, 65, 131])
def test_rows_do_not_depend_on_the_call(m):
    """A row gives the same bits alone, in any register block of a call (3 rows x 4 tiles for <= 3 rows, else
    6 x 2), in any block of 64 rows."""
    n, k = 100, 256
    tiles = bf16tile.pack_weight(_weight(n, k, 3))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    together = bf16tile.matmul(tiles, x, n, torch.float32)
    alone = torch.cat([bf16tile.matmul(tiles, x[i : i + 1].contiguous(), n, torch.float32) for i in range(m)])
    assert torch.equal(together, alone)
    shifted = bf16tile.matmul(tiles, torch.cat([x[:1], x]).contiguous(), n, torch.float32)[1:]
    assert torch.equal(shifted, together)  # other row groups, other 64-row blocks


def test_rows_read_back_exactly():
    w = _weight(37, 64, 5)

    class Layer(torch.nn.Module):
        pass

    layer = Layer()
    layer.tiles = bf16tile.pack_weight(w)
    ids = torch.tensor([36, 0, 17, 16, 36])
    assert torch.equal(bf16tile.rows_f32(layer, ids), w[ids].float())


def test_zero_padding_rows_do_not_leak():
    """The last tile's missing rows are zeros: a product never reads past the weight's own rows."""
    w = _weight(17, 64, 9)
    tiles = bf16tile.pack_weight(w)
    assert tiles.shape == (2, 32, 16, 2) and tiles[1, :, 1:].abs().sum() == 0


def test_packing_in_row_chunks_equals_packing_whole(monkeypatch):
    """The method packs a bounded chunk of rows at a time (a 128k-vocabulary head: 64 MiB, not 0.5 GB), fused
    shards included: the same tiles as packing the whole weight at once."""
    from ember.weights.base import RawTensor, float_to_f32

    monkeypatch.setattr(bf16tile, "CHUNK", 256 * 40)  # 32 rows a chunk: several, a ragged last one per shard
    parts = [(torch.randn(n, 256, generator=torch.Generator().manual_seed(n)) * 0.1).half() for n in (96, 1000)]
    shards = [RawTensor(f"w{i}", "F16", tuple(p.shape), p.numpy(), float_to_f32(torch.float16))
              for i, p in enumerate(parts)]
    layer = torch.nn.Module()
    bf16tile.Bf16TileMethod().pack(layer, shards, None, torch.bfloat16, torch.device("cpu"))
    assert torch.equal(layer.tiles, bf16tile.pack_weight(torch.cat(parts).bfloat16()))
