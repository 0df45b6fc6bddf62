"""Walk a checkpoint's named tensors into a model: each tensor goes to the layer that owns it."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import nn

from ember.config import ModelConfig
from ember.errors import ModelFormatError
from ember.layers.embedding import Embedding
from ember.layers.linear import Linear
from ember.layers.logits import TopRefiner, canonical_rows
from ember.layers.norm import RMSNorm
from ember.models.registry import model_class
from ember.quant import bf16tile
from ember.quant.base import QuantSpec
from ember.quant.gguf_blocks import GROUP32_KINDS, Canonical, decode
from ember.quant.packed import PackedBlocksMethod, compact_layouts, rows_f32
from ember.weights.base import RawTensor


def build_model(cfg: ModelConfig, tensors: Iterable[tuple[str, RawTensor]], dtype: torch.dtype,
                device: torch.device, quantize: QuantSpec | None = None) -> nn.Module:
    model = model_class(cfg)(cfg)
    packed: dict[str, tuple[str, str]] = getattr(model, "packed_modules", {})
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    embed_raw: RawTensor | None = None
    embed: Embedding | None = None
    head_raw: RawTensor | None = None
    for name, raw in tensors:
        path, _, suffix = name.rpartition(".")
        parent, _, leaf = path.rpartition(".")
        shard = ""
        if leaf in packed:
            fused, shard = packed[leaf]
            path = f"{parent}.{fused}" if parent else fused
        mod = modules.get(path)
        if isinstance(mod, Linear):
            if name == "lm_head.weight":
                head_raw = raw
            _guard(lambda m=mod, s=shard, r=raw, b=suffix == "bias": m.load(s, r, b), name)
        elif isinstance(mod, Embedding):  # loaded once the head is packed: a tied one may read from it
            embed_raw, embed = raw, mod
            _check_shape(raw, (mod.num_embeddings, mod.dim))
        elif name in params or name in buffers:
            target = params.get(name, buffers.get(name))
            _check_shape(raw, tuple(target.shape))
            target.data = raw.dequantize(torch.float32).to(device)
        # tensors the model doesn't use are skipped on purpose (e.g. unused rope caches)
    lm_head = getattr(model, "lm_head", None)
    if cfg.tie_word_embeddings and isinstance(lm_head, Linear) and embed_raw is not None:
        lm_head.load("", embed_raw)
    missing = [f"{n}: {m.missing}" for n, m in modules.items() if isinstance(m, Linear) and m.missing]
    if missing:
        raise ModelFormatError(f"the checkpoint lacks weights for: {'; '.join(missing[:5])}")
    linears = [m for m in modules.values() if isinstance(m, Linear)]
    compact = compact_layouts(sum(m.block_weights for m in linears))  # packed layouts by the model's size
    for m in linears:
        m.finalize(dtype, device, None if m is lm_head else quantize, compact)  # the head keeps its usual method
    if embed is not None and embed_raw is not None:
        head_rows = getattr(lm_head.method, "rows_f32", None) if isinstance(lm_head, Linear) else None
        if cfg.tie_word_embeddings and head_rows is not None:  # a head on ember's kernels reads its own rows
            embed.read_from(partial(head_rows, lm_head), dtype)  # the vocabulary table is held once
        else:
            embed.load(embed_raw, dtype, device, packed=dtype == torch.bfloat16 and device.type == "cpu",
                       compact=compact)
        embed_raw.release()
    if (cfg.tie_word_embeddings and isinstance(lm_head, Linear) and lm_head.method.name == "dense"
            and model.embed_tokens.weight.numel()):
        lm_head.weight = model.embed_tokens.weight  # share, don't hold a second dense copy
    # the residual stream stays fp32; matmul inputs use the compute dtype, or fp32 where every linear is on
    # ember's kernels (the int8 one splits fp32 activations into ~16 bits itself: closer to fp32 than bf16
    # inputs; the bf16 one rounds them as the norm would), which the one-call decode step needs
    body = [m for m in linears if m is not lm_head]
    kernels = (PackedBlocksMethod, bf16tile.Bf16TileMethod)
    norm_out = torch.float32 if body and all(isinstance(m.method, kernels) for m in body) else dtype
    for m in modules.values():
        if isinstance(m, RMSNorm):
            m.weight.data = m.weight.data.to(device=device, dtype=torch.float32)  # norms stay fp32: cheap, exact
            m.out_dtype = norm_out
    _attach_refiner(model, cfg, lm_head, embed_raw, head_raw)
    model.post_load()
    return model.eval()


def _attach_refiner(model: nn.Module, cfg: ModelConfig, lm_head: Linear | None, embed_raw: RawTensor | None,
                    head_raw: RawTensor | None) -> None:
    """A packed head gets exact fp32 top candidates from its block codes (ember's packed head reads them
    itself; otherwise canonical codes, shared with a tied embedding)."""
    if isinstance(lm_head, Linear) and isinstance(lm_head.method, bf16tile.Bf16TileMethod):
        lm_head.out_f32 = True  # fp32 logits of the bf16 weights: no bf16 rounding between the near-ties
        return
    if not isinstance(lm_head, Linear) or lm_head.method is None or lm_head.method.name in ("dense", "int4-gpu"):
        return  # (the GPU head keeps no host codes to refine from: its bf16 logits are final)
    if isinstance(lm_head.method, PackedBlocksMethod):
        model.refiner = TopRefiner(partial(rows_f32, lm_head))
        lm_head.out_f32 = True  # fp32 in and out (see head_logits)
        return
    emb = model.embed_tokens
    if cfg.tie_word_embeddings and emb.codes is not None:
        codes = Canonical(emb.codes, emb.scale, emb.offset, 8)
    else:
        raw = head_raw if head_raw is not None else embed_raw
        if raw is None or raw.kind not in GROUP32_KINDS:
            return
        codes = decode(raw.kind, raw.data, (raw.shape[0], raw.shape[1]))
    model.refiner = TopRefiner(canonical_rows(codes))


def _check_shape(raw: RawTensor, expect: tuple[int, ...]) -> None:
    if tuple(raw.shape) != expect:
        raise ModelFormatError(f"tensor {raw.name} has shape {tuple(raw.shape)}; the model config implies {expect}")


def _guard(fn, name: str) -> None:
    try:
        fn()
    except (KeyError, ValueError) as e:
        raise ModelFormatError(f"cannot load tensor {name}: {e}") from None
