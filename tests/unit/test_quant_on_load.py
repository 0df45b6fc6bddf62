"""Quantization on load (`ember.load(..., quantize=...)`): each method's matmul against its dequantized
reference, int8's K % 16 guard, argument checks, the output head left alone, and whole tiny models."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ember
from ember import SamplingParams
from ember.errors import ParameterError
from ember.layers.linear import Linear
from ember.quant.base import QuantSpec, select_method
from ember.quant.int8 import Int8Method, kernel_available
from ember.weights.base import RawTensor
from tests.models.tiny_gguf import write_tiny_gguf

bnb = pytest.importorskip("bitsandbytes")  # the 4-bit methods need it; int8 does not (skipped together: CI has it)
BF16 = torch.bfloat16


def _raw(w: torch.Tensor) -> RawTensor:
    """An fp32 weight [N, K] as a checkpoint tensor (rows addressable, as GGUF's are)."""
    return RawTensor("w", "F32", tuple(w.shape), w.numpy(), lambda a: a)


def _packed(spec: QuantSpec, w: torch.Tensor, dtype: torch.dtype = BF16, bias: torch.Tensor | None = None):
    layer = nn.Module()
    method = select_method([_raw(w)], dtype, torch.device("cpu"), spec)
    method.pack(layer, [_raw(w)], bias, dtype, torch.device("cpu"))
    return layer, method


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def weights() -> torch.Tensor:
    return torch.randn(96, 256, generator=torch.Generator().manual_seed(0)) * 0.05  # [N, K]


# ---- 4-bit (bitsandbytes) ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, bound", [("nf4", 0.12), ("fp4", 0.15)])  # measured ~0.09 / ~0.12 on Gaussians
@pytest.mark.parametrize("rows", [96, 40])  # 96: bitsandbytes' fused CPU layout; 40 (not % 32): portable path
@pytest.mark.parametrize("k", [256, 96])  # 96: K % 64 != 0, padded
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("t", [1, 5])
def test_4bit_matmul_vs_dequantized(weights, kind, bound, rows, k, double_quant, t):
    w = weights[:rows, :k]
    layer, method = _packed(QuantSpec(kind, double_quant), w)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(1)).to(BF16)  # [T, K]
    y = method.apply(layer, x)  # [T, N]
    assert y.shape == (t, rows) and y.dtype == BF16
    # the same blocks dequantized by bitsandbytes (rows padded to whole blocks): only bf16 rounding apart
    wp = torch.nn.functional.pad(w, (0, (-k) % 64)).to(BF16)
    q, st = bnb.functional.quantize_4bit(wp, blocksize=64, quant_type=kind, compress_statistics=double_quant)
    deq = bnb.functional.dequantize_4bit(q, st).float()[:, :k]  # [N, K]
    assert _rel(y, x.float() @ deq.T) < 1e-2
    assert _rel(y, x.float() @ w.T) < bound  # 4-bit: ~10 % of the weights' norm
    assert layer.cpu_fused == (rows % 32 == 0 and bnb.functional.has_avx512bf16())


def test_4bit_fp32_compute_and_bias(weights):
    bias = torch.randn(96)
    layer, method = _packed(QuantSpec("nf4", compute_dtype="float32"), weights, torch.float32, bias)
    assert layer.compute_dtype == torch.float32 and not layer.cpu_fused
    x = torch.randn(3, 256)
    assert _rel(method.apply(layer, x), x @ weights.T + bias) < 0.12


# ---- int8 -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, tight", [(BF16, 1e-2), (torch.float16, 2e-3), (torch.float32, 1e-5)])
@pytest.mark.parametrize("k", [256, 40, 570])  # 40 and 570: K % 16 != 0 (torch's bf16 kernel is wrong there)
@pytest.mark.parametrize("t", [1, 3, 12])  # unguarded, 2+ rows at such K crash the kernel; 12: dequantized path
def test_int8_matmul_vs_dequantized(dtype, tight, k, t):
    w = torch.randn(48, k, generator=torch.Generator().manual_seed(k)) * 0.05
    layer, method = _packed(QuantSpec("int8"), w, dtype)
    assert isinstance(method, Int8Method)
    assert layer.use_kernel == (kernel_available() and dtype == BF16)
    assert layer.k_pad == ((-k) % 16 if layer.use_kernel else 0)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(2)).to(dtype)
    y = method.apply(layer, x)
    deq = layer.qweight[:, :k].float() * layer.scales.float()[:, None]  # [N, K]
    assert y.shape == (t, 48) and y.dtype == dtype
    assert _rel(y, x.float() @ deq.T) < tight
    assert _rel(y, x.float() @ w.T) < 0.02  # per-channel int8: ~1 % of the weights' norm
    assert layer.qweight.dtype == torch.int8 and int(layer.qweight.abs().max()) == 127  # the absmax maps to 127


def test_int8_scales_follow_rows_across_fused_shards():
    a, b = torch.randn(16, 64), torch.randn(32, 64) * 10  # very different magnitudes, one fused weight
    layer = nn.Module()
    Int8Method().pack(layer, [_raw(a), _raw(b)], None, torch.float32, torch.device("cpu"))
    deq = layer.qweight.float() * layer.scales[:, None]
    assert torch.allclose(deq, torch.cat([a, b]), atol=float(torch.cat([a, b]).abs().amax(1).max()) / 254 + 1e-6)


# ---- arguments --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {tied: write_tiny_gguf(root / f"tiny-{tied}.gguf", arch="llama" if tied else "qwen2", tied=tied)
            for tied in (True, False)}


@pytest.mark.parametrize("kwargs, words", [
    (dict(quantize="nf5"), ["'nf4'", "'fp4'", "'int8'"]),
    (dict(quantize=4), ["'nf4'", "'fp4'", "'int8'"]),
    (dict(quantize="int8", double_quant=True), ["double_quant", "nf4"]),
    (dict(quantize="int8", compute_dtype="bfloat16"), ["compute_dtype", "nf4"]),
    (dict(double_quant=False), ["double_quant", "quantize"]),
    (dict(compute_dtype="float16"), ["compute_dtype", "quantize"]),
    (dict(quantize="nf4", compute_dtype="int4"), ["compute_dtype", "bfloat16"]),
    (dict(quantize="fp4", double_quant="yes"), ["double_quant", "True or False"]),
])
def test_bad_quantize_arguments(tiny, kwargs, words):
    with pytest.raises(ParameterError) as e:
        ember.load(tiny[True], **kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ParameterError, match="pip install bitsandbytes"):
        ember.load("no-such-model.gguf", quantize="nf4")  # fails before looking for the file


def test_quantized_gguf_warns_that_it_requantizes(tiny, monkeypatch):
    from ember.weights.gguf import GGUFFile

    monkeypatch.setattr(GGUFFile, "is_quantized", property(lambda self: True))
    with pytest.warns(UserWarning, match="already quantized.*int8"):
        ember.load(tiny[True], quantize="int8")


# ---- whole models ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False], ids=["llama-tied", "qwen2-untied"])
@pytest.mark.parametrize("kind, bound", [("nf4", 0.2), ("fp4", 0.25), ("int8", 0.03)])
def test_tiny_model_quantized(tiny, tied, kind, bound):
    ref = ember.load(tiny[tied], dtype="float32")
    plain = ember.load(tiny[tied], dtype="bfloat16")  # the same load without quantize
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # these weights are mostly F32/F16: no re-quantization warning
        llm = ember.load(tiny[tied], quantize=kind)
    assert llm.quantize == kind and llm.dtype == BF16 and f"quantize={kind}" in repr(llm)
    linears = {n: m for n, m in llm.engine.model.named_modules() if isinstance(m, Linear)}
    head = linears.pop("lm_head")
    assert {m.method.name for m in linears.values()} == {kind}
    assert head.method.name == plain.engine.model.lm_head.method.name != kind  # the head is left as it runs
    ids = [5, 17, 200, 33, 90, 12, 255, 1, 64, 100]
    assert _rel(llm.logits(ids), ref.logits(ids)) < bound
    outs = llm.generate([[5, 17, 200], [90, 12]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [6, 6]
    one = llm.generate([[5, 17, 200]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert one.token_ids == outs[0].token_ids  # batch of 2 = alone


def test_per_prompt_params(tiny):
    llm = ember.load(tiny[True], quantize="int8")
    seeds = [SamplingParams(temperature=1.0, max_tokens=8, seed=s, ignore_eos=True) for s in (1, 2, 1)]
    a, b, c = llm.generate([[5, 17]] * 3, seeds)
    assert a.token_ids == c.token_ids  # same seed, same text, whatever the batch
    with pytest.raises(ParameterError, match="one per prompt"):
        llm.generate([[5, 17]] * 2, seeds)


def test_row_chunks_bound_memory():
    from ember.quant.base import row_chunks

    w = torch.arange(12 * 8, dtype=torch.float32).view(12, 8)
    chunks = list(row_chunks([_raw(w[:5]), _raw(w[5:])], max_elems=16))  # 2 rows of 8 at a time
    assert max(c.shape[0] for c in chunks) == 2 and torch.equal(torch.cat(chunks), w)
