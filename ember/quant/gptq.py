"""GPTQ and AWQ 4-bit linears: public packed layouts -> canonical group-32 codes on the int4 kernel.

GPTQ (AutoGPTQ / GPTQModel / transformers): qweight int32 [K/8, N] holds 8 codes per int32 along K,
low bits first; qzeros int32 [G, N/8] packs along N, low bits first; scales fp16 [G, N]; g_idx [K]
names the group of each input column. w[n, k] = s[g, n] * (q[k, n] - z[g, n]) with g = g_idx[k];
format "gptq" (v1) stores z - 1 (read back as nibble + 1, so 0..15 -> 1..16), "gptq_v2" stores z.
AWQ GEMM (AutoAWQ WQLinear_GEMM): qweight int32 [K, N/8] and qzeros int32 [G, N/8] pack along N with
nibble i of int32 c holding column 8c + AWQ_ORDER[i]; groups are contiguous; w = (q - z) * s.

Both map exactly onto Canonical(q, scale, offset = -z * scale) per 32 columns of K: a fp16 scale times
an integer below 32 is exact in fp32. Act-order checkpoints (g_idx not sorted) are run with their input
columns permuted so every group is contiguous: x[:, perm] @ w[:, perm].T == x @ w.T.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from ember.errors import ModelFormatError
from ember.quant import packed
from ember.quant.base import QuantMethod
from ember.quant.gguf_blocks import CHUNK_ROWS, GROUP, Canonical
from ember.quant.int4 import Int4Method, kernel_available, pack_canonical
from ember.weights.base import RawTensor

KINDS = frozenset({"GPTQ", "AWQ"})
SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # nibble i of an int32 sits at bits 4i .. 4i+3
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ packing: nibble i holds column 8c + AWQ_ORDER[i]
AWQ_UNDO = tuple(AWQ_ORDER.index(j) for j in range(8))  # column 8c + j sits in nibble (0, 4, 1, 5, 2, 6, 3, 7)[j]


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., M] -> [..., M, 8] uint8 codes; the mask makes the arithmetic shift of a negative int32 safe."""
    return ((packed[..., None] >> SHIFTS) & 0xF).to(torch.uint8)


def _along_n(packed: torch.Tensor, awq: bool) -> torch.Tensor:
    """[R, N/8] int32 packed along N -> [R, N] codes (AWQ interleaves the 8 columns of each int32)."""
    nib = _nibbles(packed)  # [R, N/8, 8] by nibble
    return (nib[..., list(AWQ_UNDO)] if awq else nib).flatten(-2)


@dataclass(eq=False)  # tensors: identity, not elementwise ==
class GPTQTensor:
    """One GPTQ or AWQ linear weight as stored; duck-types RawTensor (name, kind, shape, dequantize).

    `kind` says how qweight is packed ("GPTQ": along K; "AWQ": along N, interleaved); `zero_add` is
    1 for GPTQ v1 checkpoints, which store every zero point minus one.
    """

    name: str
    kind: str
    qweight: torch.Tensor  # GPTQ: int32 [K/8, N]; AWQ: int32 [K, N/8]
    qzeros: torch.Tensor  # int32 [G, N/8]
    scales: torch.Tensor  # fp16 [G, N]
    g_idx: torch.Tensor  # int64 [K]: the group of each input column
    zero_add: int = 0
    shape: tuple[int, int] = field(init=False)  # (N, K) = (out, in), torch order

    def release(self) -> None:  # RawTensor's: the tensors come from safetensors, nothing to unmap
        pass

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ModelFormatError(f"{self.name}: unknown packed int4 kind {self.kind!r} (expected GPTQ or AWQ)")
        for key in ("qweight", "qzeros"):
            if getattr(self, key).dtype != torch.int32 or getattr(self, key).dim() != 2:
                raise ModelFormatError(f"{self.name}.{key}: expected a 2-D int32 tensor, got "
                                       f"{getattr(self, key).dtype} {tuple(getattr(self, key).shape)}")
        rows, cols = self.qweight.shape
        k, n = (rows * 8, cols) if self.kind == "GPTQ" else (rows, cols * 8)
        self.shape = (n, k)
        self.g_idx = self.g_idx.to(torch.int64)
        groups = self.scales.shape[0] if self.scales.dim() == 2 else -1
        expect = {"scales": (groups, n), "qzeros": (groups, n // 8), "g_idx": (k,)}
        for key, want in expect.items():
            got = tuple(getattr(self, key).shape)
            if got != want or n % 8:  # qzeros pack 8 output columns per int32
                raise ModelFormatError(f"{self.name}.{key}: shape {got} does not fit {self.kind} qweight "
                                       f"{tuple(self.qweight.shape)} (expected {want}, N a multiple of 8)")
        if k and (int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= groups):
            raise ModelFormatError(f"{self.name}.g_idx: group indices must lie in 0..{groups - 1}")

    def codes(self, r0: int = 0, r1: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Output rows r0:r1 -> (q [K, n] uint8, z [G, n] int16, s [G, n] fp32), unpacked."""
        r1 = self.shape[0] if r1 is None else r1
        assert r0 % 8 == 0 and r1 % 8 == 0  # qzeros hold 8 output rows per int32 (N % 8 == 0 is checked)
        if self.kind == "GPTQ":  # [K/8, n, 8] -> [K/8, 8, n]: code k = 8r + i is nibble i of row r
            q = _nibbles(self.qweight[:, r0:r1]).transpose(1, 2).reshape(-1, r1 - r0)
        else:
            q = _along_n(self.qweight[:, r0 // 8 : r1 // 8], awq=True)
        z = _along_n(self.qzeros[:, r0 // 8 : r1 // 8], awq=self.kind == "AWQ").to(torch.int16) + self.zero_add
        return q, z, self.scales[:, r0:r1].float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reference weight [N, K]: s[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]), in fp32 (exact), then dtype."""
        q, z, s = self.codes()
        w = (q.to(torch.int16) - z[self.g_idx]).float() * s[self.g_idx]  # [K, N]
        return w.t().contiguous().to(dtype)

    @cached_property
    def perm(self) -> torch.Tensor | None:
        """Input-column order that makes every group contiguous; None when it already is (no act-order)."""
        if bool((self.g_idx[1:] >= self.g_idx[:-1]).all()):
            return None
        return torch.argsort(self.g_idx, stable=True)  # [K]

    def fits_group32(self) -> bool:
        """True when every block of 32 (permuted) input columns lies in one group: group sizes that are
        multiples of 32, or one group for all of K. Otherwise only the dense path is exact."""
        if self.shape[1] % GROUP:
            return False
        perm = self.perm
        blocks = (self.g_idx if perm is None else self.g_idx[perm]).view(-1, GROUP)  # [K/32, 32]
        return bool((blocks == blocks[:, :1]).all())

    def canonical(self, r0: int = 0, r1: int | None = None) -> Canonical:
        """Rows r0:r1 as group-32 codes over the permuted input columns (`perm`); needs fits_group32()."""
        q, z, s = self.codes(r0, r1)  # [K, n], [G, n], [G, n]
        perm, g = self.perm, self.g_idx
        if perm is not None:
            q, g = q[perm], g[perm]
        block_group = g[::GROUP]  # [K/32]: the one group of each block of 32 columns
        scale = s[block_group].t().contiguous()  # [n, K/32]: a group of 64, 128, ... repeats its scale
        offset = -(z[block_group].t().float() * scale)  # w = q*s - z*s, exact in fp32
        return Canonical(q.t().contiguous(), scale, offset, 4)  # q: [n, K]

    def canonical_chunks(self, rows: int = CHUNK_ROWS) -> Iterator[Canonical]:
        for r in range(0, self.shape[0], rows):
            yield self.canonical(r, min(r + rows, self.shape[0]))


def gptq_tensor_from(prefix: str, tensors: Mapping[str, torch.Tensor], quant_config: Mapping[str, Any]) -> GPTQTensor:
    """A checkpoint's `{prefix}.qweight/.qzeros/.scales[/.g_idx]` plus its config.json `quantization_config`
    (AutoAWQ's quant_config.json keys w_bit / q_group_size are read too) -> one GPTQTensor."""
    method = str(quant_config.get("quant_method", "")).lower()
    if method not in ("gptq", "awq"):
        raise ModelFormatError(f"{prefix}: quant_method {method!r} is not supported (ember reads 4-bit 'gptq' and 'awq')")
    bits = quant_config.get("bits", quant_config.get("w_bit"))
    if bits != 4:
        raise ModelFormatError(f"{prefix}: {bits}-bit {method.upper()} is not supported (ember reads 4-bit only)")
    group = int(quant_config.get("group_size", quant_config.get("q_group_size", -1)))
    if group != -1 and group <= 0:
        raise ModelFormatError(f"{prefix}: group_size {group} is not valid (a positive size or -1)")

    def get(key: str) -> torch.Tensor:
        if f"{prefix}.{key}" not in tensors:
            raise ModelFormatError(f"{prefix}.{key} is missing from a {method.upper()} checkpoint")
        return tensors[f"{prefix}.{key}"]

    qweight, qzeros, scales = get("qweight"), get("qzeros"), get("scales")
    if method == "awq":
        version = str(quant_config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ModelFormatError(f"{prefix}: AWQ version {version!r} is not supported (ember reads 'gemm')")
        k = qweight.shape[0]
        groups = 1 if group == -1 else k / group
        if scales.shape[0] != groups:
            raise ModelFormatError(f"{prefix}.scales: {scales.shape[0]} groups, but group_size {group} "
                                   f"over K = {k} needs {groups:g}")
        return GPTQTensor(prefix, "AWQ", qweight, qzeros, scales, _contiguous_groups(k, group))
    fmt = str(quant_config.get("checkpoint_format", quant_config.get("format", "gptq"))).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ModelFormatError(f"{prefix}: GPTQ checkpoint_format {fmt!r} is not supported "
                               "(ember reads 'gptq' and 'gptq_v2')")
    g_idx = tensors.get(f"{prefix}.g_idx")  # absent in some exports: then groups are contiguous
    if g_idx is None:
        g_idx = _contiguous_groups(qweight.shape[0] * 8, group)
    return GPTQTensor(prefix, "GPTQ", qweight, qzeros, scales, g_idx, zero_add=1 if fmt == "gptq" else 0)


def _contiguous_groups(k: int, group: int) -> torch.Tensor:
    """g_idx for groups in input order: k // group_size (-1: one group for all of K)."""
    return torch.arange(k, dtype=torch.int64) // (k if group == -1 else group)


class GPTQMethod(QuantMethod):
    """GPTQ / AWQ shards as group-32 int4 codes on ember's packed-block kernel (or PyTorch's int4 kernel
    where that is unavailable); act-order by permuting x once per call."""

    name = "int4-gptq"

    def pack(self, layer: nn.Module, shards: list[RawTensor], bias: torch.Tensor | None,
             dtype: torch.dtype, device: torch.device) -> None:
        chunks = gptq_chunks(shards)
        layer.gptq_runner = packed.PackedBlocksMethod() if packed.available() else Int4Method()
        if isinstance(layer.gptq_runner, packed.PackedBlocksMethod):
            packed.pack_chunks(layer, chunks, sum(s.shape[0] for s in shards), shards[0].shape[1], 0, bias)
        else:
            pack_canonical(layer, chunks, 1, bias)
        layer.register_buffer("perm", shards[0].perm)  # type: ignore[attr-defined]  # shared: gptq_ok checked

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if layer.perm is not None:
            x = x.index_select(-1, layer.perm)  # [..., K] in the packed (group-contiguous) column order
        return layer.gptq_runner.apply(layer, x)


def gptq_ok(shards: list[Any], dtype: torch.dtype, device: torch.device) -> bool:
    """GPTQ/AWQ shards that the int4 kernel runs exactly. Fused shards (q/k/v, gate/up) share one x, so
    their act-order perms must agree; they do in real checkpoints (one Hessian per input), and where
    they do not the layer runs dense (dequantized) instead: exact, only slower. On a CUDA GPU the same
    shards go to int4_gpu.Int4GpuMethod (select_method)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and kernel_available() and gptq_shards_fit(shards)


def gptq_shards_fit(shards: list[Any]) -> bool:
    """GPTQ/AWQ shards whose group-32 canonical codes are exact and share one act-order perm (any int4 kernel)."""
    if not shards or not all(isinstance(s, GPTQTensor) and s.fits_group32() for s in shards):
        return False
    perms = [s.perm for s in shards]
    return all(p is None for p in perms) or all(p is not None and torch.equal(p, perms[0]) for p in perms)


def gptq_chunks(shards: list[Any]) -> Iterator[Canonical]:
    """Row chunks of group-32 canonical codes over the shared permuted input columns, in output order."""
    return (c for s in shards for c in s.canonical_chunks())
