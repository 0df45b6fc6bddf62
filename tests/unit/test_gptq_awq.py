"""GPTQ / AWQ int4: RTN-quantized weights packed here into each public layout -> ember's unpacking,
group-32 canonical codes and int4 kernel, against the exact reference weights and a plain-loop reader."""

from __future__ import annotations

import pytest
import torch

from ember.errors import ModelFormatError
from ember.layers.linear import Linear
from ember.quant.gptq import GPTQTensor, gptq_tensor_from
from ember.quant.int4 import kernel_available

K, N = 256, 64
PREFIX = "model.layers.0.mlp.down_proj"
AWQ_PACK = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ WQLinear_GEMM.from_linear: nibble i <- column 8c + AWQ_PACK[i]
needs_kernel = pytest.mark.skipif(not kernel_available(), reason="this torch has no CPU int4 kernel")


def _g_idx(group: int, act_order: bool, seed: int) -> torch.Tensor:
    """Group of each input column; act-order quantizes columns in a shuffled order, group by position in it."""
    size = K if group == -1 else group
    if not act_order:
        return torch.arange(K) // size
    order = torch.randperm(K, generator=torch.Generator().manual_seed(seed))
    g = torch.empty(K, dtype=torch.int64)
    g[order] = torch.arange(K) // size
    return g


def _rtn(w: torch.Tensor, g_idx: torch.Tensor, sym: bool, zmin: int) -> tuple[torch.Tensor, ...]:
    """Round to nearest per (group, output row): w [N, K] -> q [K, N], z [G, N] ints, s [G, N] fp16 and the
    exact reference weights s * (q - z) [N, K] in fp32."""
    groups = int(g_idx.max()) + 1
    z = torch.empty(groups, w.shape[0], dtype=torch.int64)
    s = torch.empty(groups, w.shape[0], dtype=torch.float16)
    for g in range(groups):
        cols = w[:, g_idx == g]  # [N, size]
        lo, hi = cols.min(1).values.clamp(max=0), cols.max(1).values.clamp(min=0)
        if sym:
            s[g] = (torch.maximum(-lo, hi) / 7.5).half()
            z[g] = 8
        else:
            s[g] = ((hi - lo) / 15).half()
            z[g] = (-lo / s[g].float()).round().clamp(zmin, 15).long()
    sf, zg = s.float()[g_idx], z[g_idx]  # [K, N]
    q = (w.t() / sf).round().add(zg).clamp(0, 15).long()  # [K, N]
    return q, z, s, ((q - zg) * sf).t().contiguous()


def _pack(vals: torch.Tensor, dim: int, order: list[int]) -> torch.Tensor:
    """Pack 4-bit ints 8 per int32 along `dim` (0: rows, 1: columns); nibble i <- element 8c + order[i]."""
    v = vals.long() & 0xF  # v1 zeros of -1 are stored as 15, as AutoGPTQ does
    v = v.t() if dim == 0 else v
    v = v.reshape(v.shape[0], -1, 8)[..., order]  # [R, C/8, 8] in nibble order
    word = (v << (4 * torch.arange(8))).sum(-1)  # [R, C/8] in 0 .. 2**32-1
    word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)  # the same bits as a signed int32
    return word.t().contiguous() if dim == 0 else word


def _checkpoint(fmt: str, group: int = 32, act_order: bool = False, sym: bool = False, seed: int = 0,
                n: int = N, order: list[int] | None = None) -> tuple[dict, dict, torch.Tensor]:
    """A random weight RTN-quantized and stored in one public layout: (tensors, quantization_config, w_ref)."""
    w = torch.randn(n, K, generator=torch.Generator().manual_seed(seed))
    g_idx = _g_idx(group, act_order, seed)
    # v1 stores z - 1, so z = 0 would wrap (AutoGPTQ's known asym overflow): RTN keeps z >= 1 there
    q, z, s, w_ref = _rtn(w, g_idx, sym, zmin=1 if fmt == "gptq" else 0)
    if fmt == "awq":
        awq = AWQ_PACK if order is None else order
        tensors = {"qweight": _pack(q, 1, awq), "qzeros": _pack(z, 1, awq), "scales": s}
        config = {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm", "zero_point": True}
    else:
        plain = list(range(8)) if order is None else order
        stored = z - 1 if fmt == "gptq" else z
        tensors = {"qweight": _pack(q, 0, plain), "qzeros": _pack(stored, 1, plain), "scales": s,
                   "g_idx": g_idx.to(torch.int32)}
        config = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order, "sym": sym,
                  "checkpoint_format": fmt}
    return {f"{PREFIX}.{k}": v for k, v in tensors.items()}, config, w_ref


def _loop_dequantize(tensors: dict, config: dict) -> torch.Tensor:
    """An independent plain-loop reader of the stored ints (no shared code with ember or the packer)."""
    qw = tensors[f"{PREFIX}.qweight"].tolist()
    qz = tensors[f"{PREFIX}.qzeros"].tolist()
    sc = tensors[f"{PREFIX}.scales"].float().tolist()
    awq = config["quant_method"] == "awq"
    k_all = len(qw) if awq else 8 * len(qw)
    n_all = len(sc[0])
    size = k_all if config["group_size"] == -1 else config["group_size"]
    g_idx = [k // size for k in range(k_all)] if awq else tensors[f"{PREFIX}.g_idx"].tolist()
    add = 1 if config.get("checkpoint_format") == "gptq" else 0

    def nibble(word: int, i: int) -> int:
        return ((word & 0xFFFFFFFF) >> (4 * i)) & 0xF

    out = torch.empty(n_all, k_all, dtype=torch.float64)
    for n in range(n_all):
        col = AWQ_PACK.index(n % 8) if awq else n % 8  # which nibble of the int32 holds output column n
        for k in range(k_all):
            g = g_idx[k]
            q = nibble(qw[k][n // 8], col) if awq else nibble(qw[k // 8][n], k % 8)
            z = nibble(qz[g][n // 8], col) + add
            out[n, k] = sc[g][n] * (q - z)
    return out.float()


LAYOUTS = [  # (checkpoint format, group size, act-order, sym)
    ("gptq", 32, False, False), ("gptq", 128, False, True), ("gptq_v2", 64, False, False),
    ("gptq", 64, True, False), ("gptq_v2", 128, True, True), ("gptq", -1, False, False),
    ("awq", 128, False, False), ("awq", 32, False, False), ("awq", -1, False, False),
]
IDS = [f"{f}-g{g}{'-act' if a else ''}{'-sym' if s else ''}" for f, g, a, s in LAYOUTS]


@pytest.mark.parametrize(("fmt", "group", "act", "sym"), LAYOUTS, ids=IDS)
def test_dequantize_is_the_exact_reference(fmt, group, act, sym):
    tensors, config, w_ref = _checkpoint(fmt, group, act, sym, seed=1)
    t = gptq_tensor_from(PREFIX, tensors, config)
    assert t.kind == ("AWQ" if fmt == "awq" else "GPTQ") and t.shape == (N, K)
    assert torch.equal(t.dequantize(), w_ref)
    assert torch.equal(_loop_dequantize(tensors, config), w_ref)  # the packer wrote what the layout says


@pytest.mark.parametrize(("fmt", "group", "act", "sym"), LAYOUTS, ids=IDS)
def test_canonical_group32_codes_are_exact(fmt, group, act, sym):
    """The kernel's input: q * scale + offset per 32 permuted columns, bit-equal to the reference, also
    when built in row chunks."""
    tensors, config, w_ref = _checkpoint(fmt, group, act, sym, seed=2)
    t = gptq_tensor_from(PREFIX, tensors, config)
    assert t.fits_group32() and (t.perm is not None) == act
    c = t.canonical()
    assert c.q.dtype == torch.uint8 and int(c.q.max()) <= 15 and c.scale.shape == (N, K // 32)
    w = torch.empty_like(w_ref)
    w[:, t.perm if act else slice(None)] = c.dequantize()  # undo the column permutation
    assert torch.equal(w, w_ref)
    chunks = list(t.canonical_chunks(rows=24))
    assert torch.equal(torch.cat([ch.q for ch in chunks]), c.q) and torch.equal(torch.cat([ch.offset for ch in chunks]), c.offset)


def test_gptq_v1_reads_a_stored_15_as_zero_point_16():
    """v1 adds 1 after masking the nibble (AutoGPTQ / transformers), so an asym z = 0 stored as -1 reads 16."""
    tensors, config, _ = _checkpoint("gptq", 32, seed=3)
    tensors[f"{PREFIX}.qzeros"][0, 0] |= 0xF  # column 0 of group 0: stored 15
    t = gptq_tensor_from(PREFIX, tensors, config)
    q, z, _ = t.codes()
    assert int(z[0, 0]) == 16
    assert torch.equal(t.dequantize(), _loop_dequantize(tensors, config))


def _linear(shard_tensors: list[GPTQTensor], outs: list[int], names: tuple[str, ...], dtype=torch.bfloat16) -> Linear:
    lin = Linear(K, outs if len(outs) > 1 else outs[0], shards=names)
    for name, t in zip(names, shard_tensors, strict=True):
        lin.load(name, t)  # type: ignore[arg-type]
    lin.finalize(dtype, torch.device("cpu"))
    return lin


def _rel_err(lin: Linear, w_ref: torch.Tensor) -> float:
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(9)).bfloat16()
    ref = x.float() @ w_ref.T
    return float((lin(x).float() - ref).abs().max() / ref.abs().max())


@needs_kernel
@pytest.mark.parametrize(("fmt", "group", "act", "sym"), LAYOUTS, ids=IDS)
def test_int4_matmul_matches_the_reference(fmt, group, act, sym, cpu_backend):
    tensors, config, w_ref = _checkpoint(fmt, group, act, sym, seed=4)
    lin = _linear([gptq_tensor_from(PREFIX, tensors, config)], [N], ("",))
    assert lin.method.name == "int4-gptq" and (lin.perm is not None) == act
    assert type(lin.gptq_runner).__name__ == ("PackedBlocksMethod" if cpu_backend == "kernels" else "Int4Method")
    assert _rel_err(lin, w_ref) < 0.01  # bf16 activations, scales and zeros; the codes are exact


def _qkv(same_perm: bool, fmt: str = "gptq") -> tuple[Linear, torch.Tensor]:
    outs = [64, 32, 32]
    # q/k/v share one input and so one Hessian: one act-order g_idx (the seed drives it; weights differ by n)
    parts = [_checkpoint(fmt, 64, act_order=fmt != "awq", seed=5 if same_perm else 5 + i, n=o)
             for i, o in enumerate(outs)]
    shards = [gptq_tensor_from(PREFIX, p[0], p[1]) for p in parts]
    return _linear(shards, outs, ("q", "k", "v")), torch.cat([p[2] for p in parts])


@needs_kernel
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2", "awq"])
def test_fused_qkv_matches_the_reference(fmt):
    lin, w_ref = _qkv(same_perm=True, fmt=fmt)
    assert lin.method.name == "int4-gptq"
    assert _rel_err(lin, w_ref) < 0.01


def test_fused_shards_with_different_act_orders_run_dense():
    lin, w_ref = _qkv(same_perm=False)
    assert lin.method.name == "dense"
    assert _rel_err(lin, w_ref) < 0.01


def test_group_not_a_multiple_of_32_runs_dense_and_exact():
    tensors, config, w_ref = _checkpoint("gptq", 16, act_order=True, seed=6)
    t = gptq_tensor_from(PREFIX, tensors, config)
    assert not t.fits_group32() and torch.equal(t.dequantize(), w_ref)
    lin = _linear([t], [N], ("",))
    assert lin.method.name == "dense"
    assert _rel_err(lin, w_ref) < 0.01


def test_fp32_runs_dense():
    tensors, config, w_ref = _checkpoint("awq", 128, seed=7)
    lin = _linear([gptq_tensor_from(PREFIX, tensors, config)], [N], ("",), dtype=torch.float32)
    assert lin.method.name == "dense" and torch.equal(lin.weight, w_ref)


@pytest.mark.parametrize("wrong", [[0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0], [0, 4, 1, 5, 2, 6, 3, 7]])
def test_a_wrong_awq_nibble_order_is_caught(wrong):
    """The packer's order is what the tests lean on: any other order must give other weights."""
    tensors, config, w_ref = _checkpoint("awq", 32, seed=8, order=wrong)
    assert not torch.equal(gptq_tensor_from(PREFIX, tensors, config).dequantize(), w_ref)


@pytest.mark.parametrize(("change", "message"), [
    ({"bits": 8}, "8-bit"),
    ({"bits": 3}, "3-bit"),
    ({"quant_method": "awq", "version": "gemv"}, "gemv"),
    ({"quant_method": "bitnet"}, "bitnet"),
    ({"checkpoint_format": "marlin"}, "marlin"),
    ({"group_size": 0}, "group_size"),
])
def test_unsupported_configs_are_model_format_errors(change, message):
    tensors, config, _ = _checkpoint("gptq", 32, seed=10)
    with pytest.raises(ModelFormatError, match=message):
        gptq_tensor_from(PREFIX, tensors, {**config, **change})


@pytest.mark.parametrize(("fmt", "key", "bad"), [
    ("gptq", "scales", lambda t: t[:, :-8]),  # N disagrees with qweight
    ("gptq", "qzeros", lambda t: t[:-1]),  # one group short
    ("gptq", "g_idx", lambda t: t[:-8]),  # K disagrees with qweight
    ("gptq", "g_idx", lambda t: t + 100),  # a group that does not exist
    ("gptq", "qweight", lambda t: t.to(torch.int64)),  # not the int32 packing
    ("awq", "scales", lambda t: t[:1]),  # 1 group but group_size 32 says 8
    ("awq", "qzeros", lambda t: t[:, :-1]),
])
def test_mismatched_shapes_are_model_format_errors(fmt, key, bad):
    tensors, config, _ = _checkpoint(fmt, 32, seed=11)
    tensors[f"{PREFIX}.{key}"] = bad(tensors[f"{PREFIX}.{key}"])
    with pytest.raises(ModelFormatError, match=key):
        gptq_tensor_from(PREFIX, tensors, config)


def test_missing_tensor_and_absent_g_idx():
    tensors, config, w_ref = _checkpoint("gptq", 64, seed=12)
    del tensors[f"{PREFIX}.g_idx"]  # without act-order the groups follow from group_size
    assert torch.equal(gptq_tensor_from(PREFIX, tensors, config).dequantize(), w_ref)
    del tensors[f"{PREFIX}.qzeros"]
    with pytest.raises(ModelFormatError, match="qzeros is missing"):
        gptq_tensor_from(PREFIX, tensors, config)


def test_autoawq_config_keys():
    """AutoAWQ's own quant_config.json says w_bit / q_group_size."""
    tensors, _, w_ref = _checkpoint("awq", 64, seed=13)
    config = {"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "zero_point": True, "version": "GEMM"}
    assert torch.equal(gptq_tensor_from(PREFIX, tensors, config).dequantize(), w_ref)
