"""One C call per decode step for Llama-family and Gemma 3 models on ember's packed CPU kernels
(kernels/csrc/decode_step.c).

Taken when every sequence of the step decodes one token and every linear of the body is packed (GGUF block
codes, or bf16 tiles for float weights) without a bias; anything else (prefill, mixed steps, other formats)
runs the per-op path, which computes the same numbers with the same kernels. EMBER_FUSED=0 turns it off.
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch import nn

from ember.kernels import cpu_ops
from ember.kernels.ops import ACTS
from ember.layers.attention import ForwardContext
from ember.quant import bf16tile, packed

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
Rope = tuple[torch.Tensor, torch.Tensor]


class _Linear(ctypes.Structure):
    _fields_ = [("codes", _P), ("s16", _P), ("o16", _P), ("mode", _I)]


class _Layer(ctypes.Structure):
    _fields_ = [("in_norm", _P), ("mlp_norm", _P), ("q_norm", _P), ("k_norm", _P), ("attn_out_norm", _P),
                ("mlp_out_norm", _P), ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear),
                ("kc", _P), ("vc", _P), ("window", _I), ("rope", _I)]


class _Dims(ctypes.Structure):
    _fields_ = [(n, _I) for n in ("layers", "d", "nq", "nkv", "dh", "inter", "half", "s_slots", "amx_rows",
                                  "act")] + [(n, _F) for n in ("eps", "qk_eps", "scale", "softcap")]


BF16_TILES = 1 << 12  # decode_step.c's mode flag for bf16 tiles


def _lin(m: nn.Module) -> _Linear:
    if isinstance(m.method, bf16tile.Bf16TileMethod):
        return _Linear(m.tiles.data_ptr(), None, None, BF16_TILES)
    return _Linear(m.codes.data_ptr(), m.s16.data_ptr(), m.o16.data_ptr(), packed.mode(m))


def _kernel_linear(m: nn.Module) -> bool:
    """A linear the fused step can call: packed block codes or bf16 tiles, without a bias."""
    return isinstance(m.method, (packed.PackedBlocksMethod, bf16tile.Bf16TileMethod)) and m.bias is None


def _ptr(m: nn.Module | None) -> int | None:
    return None if m is None else m.weight.data_ptr()


def _norms(layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module | None, nn.Module | None]:
    """(input norm, pre-MLP norm, attention-output norm, MLP-output norm) of a Llama or Gemma 3 layer."""
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma's sandwich
        return (layer.input_layernorm, layer.pre_feedforward_layernorm, layer.post_attention_layernorm,
                layer.post_feedforward_layernorm)
    return layer.input_layernorm, layer.post_attention_layernorm, None, None


class DecodeStep:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._tables: tuple[ctypes.Array, _Dims] | None = None  # per-layer pointers and the shapes: fixed
        self._cache_key: tuple[int, ...] = ()

    @staticmethod
    def build(model: nn.Module) -> DecodeStep | None:
        """None unless the model qualifies (see the module docstring)."""
        if os.environ.get("EMBER_FUSED", "1") == "0" or cpu_ops() is None:
            return None
        eps = {model.norm.eps}
        for layer in model.layers:
            a, mlp = layer.self_attn, layer.mlp
            lins = (a.qkv_proj, a.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if not all(_kernel_linear(m) for m in lins):
                return None
            norms = [n for n in _norms(layer) if n is not None]
            if any(n.out_dtype != torch.float32 for n in norms[:2]):
                return None
            eps |= {n.eps for n in norms}
            if a.dh > 256 or a.h // a.hkv > 16:  # the decode attention kernel's limits
                return None
        return DecodeStep(model) if len(eps) == 1 else None  # the kernel takes one eps for every norm

    def _layer_tables(self, ctx: ForwardContext, half: int) -> tuple[ctypes.Array, _Dims]:
        """Built once per KV cache (the engine allocates it once: its lists and first tensors identify it) and
        activation mode (set_act_bits may change it)."""
        key = (id(ctx.k_cache), id(ctx.v_cache), ctx.k_cache[0].data_ptr(), ctx.v_cache[0].data_ptr(),
               _lin(self.model.layers[0].mlp.down_proj).mode)
        if self._tables is None or key != self._cache_key:
            m, a = self.model, self.model.layers[0].self_attn
            dims = _Dims(len(m.layers), m.norm.weight.shape[0], a.h, a.hkv, a.dh, m.layers[0].mlp.inter, half,
                         ctx.k_cache[0].shape[1], packed.MAX_GEMV_ROWS if packed.amx_available() else 1 << 62,
                         ACTS[m.layers[0].mlp.act], m.norm.eps, a.q_norm.eps if a.q_norm is not None else 1e-6,
                         a.scale, getattr(a, "softcap", None) or 0.0)
            rows = []
            for i, layer in enumerate(self.model.layers):
                a, mlp = layer.self_attn, layer.mlp
                n_in, n_mlp, n_attn_out, n_mlp_out = _norms(layer)
                rows.append(_Layer(_ptr(n_in), _ptr(n_mlp), _ptr(a.q_norm), _ptr(a.k_norm), _ptr(n_attn_out),
                                   _ptr(n_mlp_out), _lin(a.qkv_proj), _lin(a.o_proj), _lin(mlp.gate_up_proj),
                                   _lin(mlp.down_proj), ctx.k_cache[i].data_ptr(), ctx.v_cache[i].data_ptr(),
                                   getattr(a, "window", None) or 0, int(not getattr(a, "sliding", True))))
            self._tables, self._cache_key = ((_Layer * len(rows))(*rows), dims), key
        return self._tables

    def __call__(self, x: torch.Tensor, ropes: list[Rope], ctx: ForwardContext) -> torch.Tensor | None:
        """x: [T, D] fp32 embeddings; ropes: cos/sin tables [T, rd/2] (Llama: one; Gemma: local, global)
        -> final-normed hidden states [T, D] fp32, or None: take the per-op path."""
        t = x.shape[0]
        kc = ctx.k_cache[0]
        if not ctx.all_decode or kc.dtype != torch.bfloat16 or not kc.is_contiguous() or ctx.paged is not None:
            return None  # not every sequence decodes, a cache the kernels do not read, or the Triton path
        layers, dims = self._layer_tables(ctx, ropes[0][0].shape[-1])
        tables = [r.contiguous() for rope in ropes for r in rope]  # cos, sin per table
        ptrs = (_P * 4)(*[tables[i % len(tables)].data_ptr() for i in range(4)])
        x = x.contiguous()
        out = torch.empty_like(x)
        slots, _, lens = ctx.row_tables
        slots, lens = slots.contiguous(), lens.contiguous()
        cpu_ops().ember_decode_step(  # type: ignore[union-attr]
            layers, ctypes.byref(dims), x.data_ptr(), ptrs, ctx.slot_mapping.data_ptr(), slots.data_ptr(),
            lens.data_ptr(), slots.shape[1], t, self.model.norm.weight.data_ptr(), out.data_ptr())
        return out
