"""GGUF block codes kept packed in ember's own layout and run by ember's kernels (kernels/csrc).

Per block of 32 weights: 16 bytes of nibbles, one uint32 bit plane per code bit above 4, and fp16 scale
and offset — 20 bytes for 4-bit codes, as Q4_1 itself. On CPUs with AMX every batch size runs one AMX
kernel straight from the codes (its cost barely grows with the rows, and a row's result never depends
on its batch neighbours). Without AMX: the AVX512-BF16 gemv up to 8 rows; beyond, the weight is decoded
to bf16 a row chunk at a time for PyTorch's bf16 matmul.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ember.kernels import cpu_ops
from ember.quant.base import QuantMethod
from ember.quant.gguf_blocks import GROUP, KIND_BITS, Canonical
from ember.quant.int4 import INT4_KINDS, gguf_chunks
from ember.weights.base import RawTensor

MAX_GEMV_ROWS = 8  # the fused kernel keeps one accumulator per activation row
MIN_AMX_ROWS = 4  # from here on the AMX kernel beats the gemv (SmolLM2's linears, 2 threads)
DEQUANT_ROWS = 8192  # prefill decodes at most this many weight rows to bf16 at once


def available() -> bool:
    lib = cpu_ops()
    return lib is not None and bool(lib.ember_qgemm_available())


@functools.cache
def amx_available() -> bool:
    """AMX tiles (Sapphire Rapids and later) and the kernel built for them; asks Linux for the tile state."""
    lib = cpu_ops()
    return lib is not None and bool(lib.ember_amx_available()) and os.environ.get("EMBER_AMX", "1") != "0"


def pack_blocks(c: Canonical, planes: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Canonical codes [N, K] -> nibbles [N, ceil(K/64), 32] u8, bit planes [N, K/32, planes] i32, s/o fp16 [N, K/32]."""
    n, k = c.q.shape
    q = c.q.view(n, k // GROUP, GROUP)  # [N, B, 32]
    if q.shape[1] % 2:  # an odd block count gets a phantom block of zero codes to complete its pair
        q = torch.cat((q, torch.zeros(n, 1, GROUP, dtype=q.dtype)), dim=1)
    pairs = q.view(n, -1, 2, GROUP)  # [N, B/2, 2, 32]
    nib = (pairs[:, :, 0] & 15) | ((pairs[:, :, 1] & 15) << 4)  # byte j: code j of blocks 2i and 2i+1
    q = q[:, : k // GROUP]
    bits = None
    if planes:  # bit 4+p of the 32 codes -> 4 little-endian bytes -> one uint32 (stored as int32)
        byte_w = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
        planes_u8 = [(((q >> (4 + p)) & 1).view(n, -1, 4, 8) * byte_w).sum(-1, dtype=torch.uint8)
                     for p in range(planes)]  # [N, B, 4] each
        bits = torch.stack(planes_u8, dim=2).contiguous().view(torch.int32).squeeze(-1)  # [N, B, planes]
    return nib.contiguous(), bits, c.scale.to(torch.float16), c.offset.to(torch.float16)


def pack_chunks(layer: nn.Module, chunks: Iterable[Canonical], planes: int, bias: torch.Tensor | None) -> None:
    parts = [pack_blocks(c, planes) for c in chunks]
    layer.nib = nn.Parameter(torch.cat([p[0] for p in parts]), requires_grad=False)
    layer.bit_planes = None if not planes else nn.Parameter(torch.cat([p[1] for p in parts]), requires_grad=False)
    layer.s16 = nn.Parameter(torch.cat([p[2] for p in parts]), requires_grad=False)
    layer.o16 = nn.Parameter(torch.cat([p[3] for p in parts]), requires_grad=False)
    layer.planes = planes
    layer.bias = None if bias is None else nn.Parameter(bias.to(torch.bfloat16), requires_grad=False)


def _args(layer: nn.Module) -> tuple:
    bp = layer.bit_planes
    return (layer.nib.data_ptr(), None if bp is None else bp.data_ptr(), layer.planes, layer.s16.data_ptr(),
            layer.o16.data_ptr())


def dequantize_rows(layer: nn.Module, r0: int, r1: int) -> torch.Tensor:
    """Weight rows [r0, r1) as bf16 [r1 - r0, K]."""
    k = layer.s16.shape[1] * GROUP
    out = torch.empty(r1 - r0, k, dtype=torch.bfloat16)
    cpu_ops().ember_qdequant(*_args(layer), r0, r1, k, out.data_ptr())  # type: ignore[union-attr]
    return out


def rows_f32(layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Weight rows `ids` [n] (any order) in fp32 [n, K], computed q * s + o as gguf-py does."""
    ids = ids.to(torch.int64).contiguous()
    k = layer.s16.shape[1] * GROUP
    out = torch.empty(ids.shape[0], k)
    cpu_ops().ember_qrows_f32(*_args(layer), ids.data_ptr(), ids.shape[0], k, out.data_ptr())  # type: ignore[union-attr]
    return out


class PackedBlocksMethod(QuantMethod):
    """GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K on ember's kernel: 4-bit codes + bit planes per block."""

    name = "packed"

    def pack(self, layer: nn.Module, shards: list[RawTensor], bias: torch.Tensor | None,
             dtype: torch.dtype, device: torch.device) -> None:
        pack_chunks(layer, gguf_chunks(shards), max(KIND_BITS[s.kind] for s in shards) - 4, bias)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if x.dtype != torch.bfloat16 or not x.is_contiguous():
            x = x.to(torch.bfloat16).contiguous()  # [T, K]
        m, k = x.shape
        n = layer.nib.shape[0]
        # Where AMX exists every row takes it, whatever the batch: a row's result then never depends on
        # its batch neighbours (batched output equals single output). A layer marked not batch-invariant
        # (the refined head, whose top candidates are recomputed exactly; every layer when the user
        # opts out) takes the faster gemv for a few rows.
        if amx_available() and (m >= MIN_AMX_ROWS or getattr(layer, "batch_invariant", True)):
            y = torch.empty(m, n, dtype=torch.bfloat16)
            cpu_ops().ember_qgemm_amx(*_args(layer), x.data_ptr(), m, n, k, None, y.data_ptr())  # type: ignore[union-attr]
        elif m <= MAX_GEMV_ROWS:
            y = torch.empty(m, n, dtype=torch.bfloat16)
            cpu_ops().ember_qgemm(*_args(layer), x.data_ptr(), m, n, k, None, y.data_ptr())  # type: ignore[union-attr]
        else:
            y = torch.cat([F.linear(x, dequantize_rows(layer, r, min(n, r + DEQUANT_ROWS)))
                           for r in range(0, n, DEQUANT_ROWS)], dim=-1)
        if layer.bias is not None:
            y = y + layer.bias
        return y.view(*shape[:-1], n)


def set_batch_invariant(model: nn.Module, on: bool) -> None:
    """on=False: a few rows (single-stream decode) take the gemv, ~25 % faster on AMX machines, but a
    sequence's numbers then depend on how many sequences share its step."""
    for mod in model.modules():
        if hasattr(mod, "nib") and not getattr(mod, "refined_head", False):
            mod.batch_invariant = on


def packed_ok(shards: list[RawTensor], dtype: torch.dtype, device: torch.device) -> bool:
    return (device.type == "cpu" and dtype == torch.bfloat16 and available()
            and all(s.kind in INT4_KINDS and len(s.shape) == 2 and s.shape[1] % GROUP == 0 for s in shards))
