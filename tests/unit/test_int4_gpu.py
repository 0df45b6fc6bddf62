"""The CUDA int4 layout (Int4GpuMethod), checked on the CPU: GGUF and GPTQ/AWQ codes -> nibbles + scales/zeros
whose dequant matches the reference weights to bf16 rounding, and whose matmul on the CPU twin of the kernel
(same formula: (q - 8) * scale + zero) matches x @ W.T; the nibble order the CUDA converter reads; the gate
and selection. Tests marked `cuda` run the real kernel where a GPU is present."""

from __future__ import annotations

import pytest
import torch

from ember.layers.linear import Linear
from ember.quant import int4_gpu
from ember.quant.base import DenseMethod, select_method
from ember.quant.gguf_blocks import GROUP, Canonical, decode
from ember.quant.gptq import gptq_tensor_from
from ember.quant.int4 import kernel_available, to_planes
from ember.quant.int4_gpu import (
    GPU_KINDS,
    Int4GpuMethod,
    coarsest_group,
    dequant,
    inner_k_tiles,
    pack_nibbles,
    shapes_ok,
    to_gpu_layout,
    unpack_nibbles,
)
from tests.unit.test_gptq_awq import IDS, LAYOUTS, PREFIX, _checkpoint
from tests.unit.test_int4 import _raw

N, K = 64, 256
KINDS = sorted(GPU_KINDS)
BF16 = torch.bfloat16
needs_kernel = pytest.mark.skipif(not kernel_available(), reason="this torch has no CPU int4 kernel")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _layout(c: Canonical, planes: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """What Int4GpuMethod.pack keeps: nibbles, scales_zeros at the coarsest group, and that group."""
    q, sz = to_gpu_layout(c, planes)
    group = coarsest_group(sz, c.q.shape[1])
    return q, sz[:: group // GROUP].contiguous(), group


def _bf16_bound(c: Canonical, planes: int) -> torch.Tensor:
    """Elementwise bound on |dequant - w|: every plane's scale and zero rounded to bf16 (relative 2^-8 each),
    then the sum rounded to bf16 once (relative 2^-8)."""
    q, s, z = to_planes(c, planes)
    n = q.shape[0]
    g = (q.view(n, -1, GROUP).double() - 8).abs()
    terms = (g * s.double().abs()[..., None] + z.double().abs()[..., None]).view(n, planes, -1).sum(1)
    return 2**-8 * (terms + c.dequantize().double().abs()) * 1.001


def _twin_matmul(x: torch.Tensor, q: torch.Tensor, sz: torch.Tensor, group: int, planes: int) -> torch.Tensor:
    """The CPU kernel with the same formula, fed from the CUDA layout's nibbles and scales_zeros."""
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(q).to(torch.int32).contiguous(), 1)
    xk = torch.cat((x, x), dim=-1) if planes == 2 else x
    return torch.ops.aten._weight_int4pack_mm_for_cpu(xk, w, group, sz)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref).abs().max() / ref.abs().max())


def _x(m: int, k: int = K, device: str = "cpu") -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device, BF16)


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_dequant_matches_gguf_py_to_bf16_rounding(kind):
    raw = _raw(kind, N, K, seed=1)
    c = decode(raw.kind, raw.data, raw.shape)
    planes = 2 if c.bits > 4 else 1
    q, sz, group = _layout(c, planes)
    assert q.dtype == torch.uint8 and q.shape == (N, planes * K // 2)
    assert sz.dtype == BF16 and sz.shape == (planes * K // group, N, 2) and group == 32
    ref = raw.dequantize()  # gguf-py
    err = (dequant(q, sz, group, planes).double() - ref.double()).abs()
    assert (err <= _bf16_bound(c, planes)).all(), float(err.max())


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
def test_gguf_layout_on_the_cpu_twin_kernel(kind):
    raw = _raw(kind, N, K, seed=2)
    planes = 2 if kind.startswith("Q5") else 1
    q, sz, group = _layout(decode(raw.kind, raw.data, raw.shape), planes)
    x = _x(5)
    assert _rel(_twin_matmul(x, q, sz, group, planes), x.float() @ raw.dequantize().T) < 0.02


@pytest.mark.parametrize(("fmt", "group", "act", "sym"), LAYOUTS, ids=IDS)
def test_gptq_awq_layout(fmt, group, act, sym):
    """GPTQ/AWQ codes keep their own group (64-256 from repeated group-32 scales; -1: 256 here) and run with
    x permuted for act-order: dequant, the CPU twin and the method's own prefill path all match w_ref."""
    tensors, config, w_ref = _checkpoint(fmt, group, act, sym, seed=3)
    t = gptq_tensor_from(PREFIX, tensors, config)
    c = t.canonical()
    perm = t.perm if act else torch.arange(K)
    q, sz, g = _layout(c, 1)
    assert g == (256 if group == -1 else group)
    err = (dequant(q, sz, g).double() - w_ref[:, perm].double()).abs()
    assert (err <= _bf16_bound(c, 1)).all(), float(err.max())
    x = _x(5)
    ref = x.float() @ w_ref.T
    if kernel_available():
        assert _rel(_twin_matmul(x[:, perm], q, sz, g, 1), ref) < 0.01
    lin = Linear(K, N)
    lin.method = Int4GpuMethod()
    lin.method.pack(lin, [t], None, BF16, torch.device("cpu"))
    assert lin.group == g and (lin.perm is not None) == act and lin.qweight is None  # no CUDA pack on the CPU
    assert _rel(lin(x), ref) < 0.01


def test_nibble_order_hand_computed():
    """The CUDA converter takes uint8 [N, K/2] with the even k in the high nibble (int4mm.cu's comment:
    int32 v[0] v[1] ... -> byte v[0] << 4 | v[1]; torch's own tests pack q[:, ::2] << 4 | q[:, 1::2])."""
    q = torch.tensor([[1, 2, 3, 4, 15, 0], [0, 15, 7, 8, 9, 10]])
    b = pack_nibbles(q)
    assert b.dtype == torch.uint8 and b.tolist() == [[0x12, 0x34, 0xF0], [0x0F, 0x78, 0x9A]]
    assert torch.equal(unpack_nibbles(b), q.to(torch.uint8))


def test_layout_of_a_hand_made_block():
    """One row, one Q4_1-like block (q = k % 16, scale 0.5, offset -1): zero = offset + 8 * scale."""
    q = (torch.arange(32) % 16).to(torch.uint8)[None]
    c = Canonical(q, torch.tensor([[0.5]]), torch.tensor([[-1.0]]), 4)
    nib, sz = to_gpu_layout(c, 1)
    assert nib[0, :8].tolist() == [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF] and nib.shape == (1, 16)
    assert sz.tolist() == [[[0.5, 3.0]]]  # [K/32, N, 2]
    assert dequant(nib, sz, 32).float().tolist() == [[0.5 * (k % 16) - 1 for k in range(32)]]


def test_fused_two_plane_layer_prefill_in_row_tiles(monkeypatch):
    """q Q4_K + k Q5_0 + v Q4_0 with a bias: two planes for all; the prefill path in small row tiles and in
    chunked decoding equals the one-shot weights."""
    import ember.quant.int4 as int4

    shards = [_raw("Q4_K", 64, K, 4), _raw("Q5_0", 32, K, 5), _raw("Q4_0", 32, K, 6)]
    bias = torch.linspace(-1, 1, 128) * 1000  # as large as the outputs: a lost bias shows

    def build() -> Linear:
        lin = Linear(K, [64, 32, 32], bias=True, shards=("q", "k", "v"))
        lin.method = Int4GpuMethod()
        lin.method.pack(lin, shards, bias, BF16, torch.device("cpu"))
        return lin

    whole = build()
    assert whole.planes == 2 and whole.qnibbles.shape == (128, K) and whole.scales_zeros.shape == (2 * K // 32, 128, 2)
    w_ref = torch.cat([s.dequantize() for s in shards])
    x = _x(20)
    ref = x.float() @ w_ref.T + bias.bfloat16().float()
    one_shot = whole(x)
    assert _rel(one_shot, ref) < 0.02
    monkeypatch.setattr(int4, "CHUNK_ROWS", 40)  # decoding in row chunks that straddle the shards
    monkeypatch.setattr(int4_gpu, "TILE_ELEMS", 24 * 2 * K)  # 24-row tiles: 128 is not a multiple
    chunked = build()
    for name in ("qnibbles", "scales_zeros"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name)), name
    assert torch.equal(chunked(x), one_shot)


def test_kernel_shape_helpers():
    assert [inner_k_tiles(k) for k in (256, 512, 320, 96, 32)] == [8, 8, 4, 2, 2]
    sz = torch.randn(16, 8, 2).repeat_interleave(4, dim=0)  # [64 groups of 32, N, 2]: groups of 128
    assert coarsest_group(sz, 2048) == 128 and coarsest_group(sz, 1024) == 128  # one plane; two
    three = sz[:12]  # K' = 384: 256 does not divide it
    assert coarsest_group(three, 384) == 128 and coarsest_group(three, 192) == 64  # no group straddles planes
    sz[4:6, 3, 1] += 1  # half of one group of 128 has another zero
    assert coarsest_group(sz, 2048) == 64
    sz[4, 3, 0] += 1
    assert coarsest_group(sz, 2048) == 32


def test_gate_and_selection(monkeypatch):
    def ok(*shards):
        return shapes_ok(list(shards))

    assert ok(_raw("Q4_K", 64, K, 1), _raw("Q5_0", 32, K, 2))
    assert not ok(_raw("Q6_K", 64, K, 1)) and not ok(_raw("Q8_0", 64, K, 1))
    assert not ok(_raw("Q4_K", 64, K, 1), _raw("Q6_K", 32, K, 2))  # one dense shard: the layer runs dense
    assert not ok(_raw("Q4_0", 60, K, 1))  # N % 8
    gptq = [gptq_tensor_from(PREFIX, *_checkpoint("gptq", 64, True, seed=s)[:2]) for s in (5, 6)]
    assert ok(gptq[0]) and not ok(*gptq)  # different act-orders share no x
    assert not ok(gptq_tensor_from(PREFIX, *_checkpoint("gptq", 16, seed=7)[:2]))  # groups of 16
    q4 = [_raw("Q4_K", 64, K, 1)]
    cuda_dev, cpu = torch.device("cuda"), torch.device("cpu")
    assert not int4_gpu.int4_gpu_ok(q4, BF16, cpu)
    assert select_method(q4, BF16, cpu).name != "int4-gpu"  # the CPU order is untouched
    monkeypatch.setattr(int4_gpu, "int4_gpu_ok", lambda shards, dtype, device: shapes_ok(shards))  # a GPU
    assert isinstance(select_method(q4, BF16, cuda_dev), Int4GpuMethod)
    assert isinstance(select_method([_raw("Q6_K", 64, K, 1)], BF16, cuda_dev), DenseMethod)


# ---- on a GPU: the real kernel ----

def _gpu_linear(shards: list, outs: list[int], k: int = K) -> Linear:
    names = tuple("abc"[: len(outs)])
    lin = Linear(k, outs, shards=names)
    for name, s in zip(names, shards, strict=True):
        lin.load(name, s)
    lin.finalize(BF16, torch.device("cuda"))
    assert lin.method.name == "int4-gpu" and lin.qweight is not None
    return lin


@cuda
def test_cuda_converter_reads_the_hand_computed_nibbles():
    """Lane t of n-tile 0, k-tile pair 0 holds row t // 4, bytes t%4 + (0, 4, 8, 12): their high nibbles
    (even k) in bits 0-15, low nibbles (odd k) in bits 16-31 (int4mm.cu matrix_to_m16n8k16_Bint4_layout)."""
    q = (torch.arange(32)[None] + torch.arange(8)[:, None]) % 16  # [8, 32]: q[n, k] = (n + k) % 16
    w = torch.ops.aten._convert_weight_to_int4pack(pack_nibbles(q).cuda(), 2).cpu()  # [1, 1, 32, 1]
    assert (int(w[0, 0, 0, 0]) & 0xFFFFFFFF) == 0x91918080  # row 0: k 0, 8, 16, 24 | 1, 9, 17, 25
    for t in range(32):
        ks = [2 * (t % 4 + d) for d in (0, 4, 8, 12)]
        want = sum(int(q[t // 4, k]) << (4 * i) | int(q[t // 4, k + 1]) << (16 + 4 * i) for i, k in enumerate(ks))
        assert (int(w[0, 0, t, 0]) & 0xFFFFFFFF) == want, t


@cuda
@pytest.mark.parametrize("m", [1, 4, 16, 64, 300])  # 300 > DECODE_ROWS: the prefill path
@pytest.mark.parametrize(("kinds", "k"), [(("Q4_0",), 96), (("Q4_1",), 320), (("Q4_K", "Q5_K"), K),
                                          (("Q5_0", "Q4_0"), 320)])
def test_cuda_gguf_matmul(kinds, k, m):
    """inner_k_tiles 2 (K' = 96), 4 (K' = 320) and 8 (two planes: K' = 512, 640), decode (kernel) and prefill (300 rows)."""
    shards = [_raw(kind, 32 * (i + 1), k, 10 + i) for i, kind in enumerate(kinds)]
    lin = _gpu_linear(shards, [s.shape[0] for s in shards], k)
    w_ref = torch.cat([s.dequantize() for s in shards]).cuda()
    x = _x(m, k, "cuda")
    got = lin(x)
    assert _rel(got, x.float() @ w_ref.T) < 0.02
    dense = int4_gpu.dequant_linear(x, lin.qnibbles, lin.scales_zeros, lin.group, lin.planes)
    assert _rel(got, dense.float()) < 0.01  # the kernel and the prefill path agree


@cuda
@pytest.mark.parametrize("m", [1, 4, 16, 64, 300])  # 300 > DECODE_ROWS: the prefill path
@pytest.mark.parametrize(("fmt", "group", "act"), [("gptq", 128, True), ("awq", 64, False), ("gptq_v2", -1, False)])
def test_cuda_gptq_awq_matmul(fmt, group, act, m):
    tensors, config, w_ref = _checkpoint(fmt, group, act, seed=20)
    lin = _gpu_linear([gptq_tensor_from(PREFIX, tensors, config)], [N])
    assert lin.group == (256 if group == -1 else group)
    x = _x(m, K, "cuda")
    assert _rel(lin(x), x.float() @ w_ref.cuda().T) < 0.01
