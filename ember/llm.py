"""Offline API over the engine: generate(), stream(), chat(). One generation path for every surface."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ember.config import (
    EngineConfig,
    ModelConfig,
    default_kv_bytes,
    default_step_tokens,
    gpu_kv_bytes,
    resolve_device,
    resolve_dtype,
)
from ember.engine.engine import Engine
from ember.engine.kv_cache import KVCache
from ember.engine.outputs import CompletionOutput, RequestOutput
from ember.engine.runner import resolve_attention
from ember.errors import ParameterError, TemplateError
from ember.prompts import Frontend, Messages, Prompt, PromptEncoder
from ember.quant.base import QuantSpec
from ember.sampling_params import SamplingParams
from ember.structured.chat import plan_chat
from ember.tokenizer import Tokenizer


class LLM(PromptEncoder):
    """A loaded model with its engine. Build one with `ember.load(...)`."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_config: ModelConfig, source: Path,
                 device: torch.device, dtype: torch.dtype, chat_template: str | None = None,
                 load_seconds: float = 0.0, quantize: str | None = None,
                 generation_defaults: dict[str, Any] | None = None) -> None:
        self.engine, self.tokenizer, self.config, self.source = engine, tokenizer, model_config, source
        self.device, self.dtype, self.chat_template = device, dtype, chat_template
        self.load_seconds = load_seconds
        self.quantize = quantize  # on-load quantization of the linears ("nf4", "fp4", "int8"), if any
        # the model's own sampling defaults (generation_config.json); they apply when no params are given
        self.generation_defaults = dict(generation_defaults or {})
        try:
            self.default_params = SamplingParams(**self.generation_defaults)
        except ParameterError as e:
            raise ParameterError(f"generation_config.json of {source.name}: {e}") from None

    def __repr__(self) -> str:
        return (f"LLM({self.source.name}, arch={self.config.architecture}, device={self.device}, "
                f"dtype={str(self.dtype).removeprefix('torch.')}, context={self.engine.max_model_len}"
                + (f", quantize={self.quantize})" if self.quantize else ")"))

    def frontend(self) -> Frontend:
        """What a server's front end needs to turn requests into token ids (no weights; picklable)."""
        return Frontend(self.tokenizer, self.chat_template, self.engine.max_model_len, self.generation_defaults)

    def logits(self, prompt: Prompt) -> torch.Tensor:
        """Next-token logits [S, V] (fp32) at every position of the prompt: scoring, perplexity."""
        ids = self.encode(prompt)
        if not 0 < len(ids) <= min(self.engine.max_model_len, self.engine.kv.capacity_tokens):
            raise ParameterError(f"cannot score {len(ids)} tokens: give 1..{self.engine.max_model_len}")
        return self.engine.runner.score(ids)

    # ---- generation ---------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[CompletionOutput]:
        """Generate for one or many prompts (batched by the engine); outputs in prompt order.

        `params` is one SamplingParams for all, or one per prompt (e.g. a seed each)."""
        batch = [prompts] if isinstance(prompts, str) or _is_token_list(prompts) else list(prompts)
        ids = [self.encode(p) for p in batch]
        if params is None:
            per = [self._defaults_for(i) for i in ids]
        elif isinstance(params, SamplingParams):
            per = [params] * len(batch)
        else:
            per = list(params)
            if len(per) != len(batch) or not all(isinstance(p, SamplingParams) for p in per):
                raise ParameterError(f"params: give one SamplingParams, or one per prompt ({len(batch)}); "
                                     f"got {len(per)} items")
        return self._run(ids, per)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield RequestOutput deltas (text, token ids, logprobs) as they are generated.

        Leaving the loop early (break, exception, Ctrl-C) aborts the request and frees its cache.
        """
        ids = self.encode(prompt)
        return self._stream_ids(ids, params or self._defaults_for(ids))

    def chat(self, messages: Messages, params: SamplingParams | None = None, *, stream: bool = False,
             tools: Sequence[Any] | None = None, tool_choice: Any = None, parallel_tool_calls: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True, **template_kwargs: Any
             ) -> CompletionOutput | Iterator[RequestOutput]:
        """Reply to a conversation rendered with the model's chat template (or `chat_template`).

        tools: OpenAI tool dicts or plain Python functions (type hints + docstring). The reply's calls come
        back parsed: `out.tool_calls` (finish_reason "tool_calls"), `out.text` being the rest of the reply;
        streamed, each output carries `tool_calls` deltas in OpenAI's shape. tool_choice: "auto" (default
        with tools), "none", "required" or a function's name; a required or named call is enforced by a
        grammar. Tool results go back as {"role": "tool", "tool_call_id": ..., "content": ...} messages.
        """
        template = chat_template or self.template
        plan = plan_chat(messages, tools, tool_choice, parallel_tool_calls, template, self.tokenizer)
        ids = self.encode_chat(plan.messages, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                               **{**template_kwargs, **plan.template_kwargs})
        params = plan.params(params or self._defaults_for(ids))
        tool_outputs = plan.outputs()
        if stream:
            raw = self._stream_ids(ids, params)
            return raw if tool_outputs is None else _mapped(raw, tool_outputs)
        out = self._run([ids], [params])[0]
        if tool_outputs is not None:
            whole = tool_outputs(RequestOutput(out.request_id, out.text, [], True, out.finish_reason, out.usage))  # type: ignore[arg-type]
            out.text, out.finish_reason, out.tool_calls = whole.text, whole.finish_reason, tool_outputs.calls
        return out

    def _defaults_for(self, ids: list[int]) -> SamplingParams:
        """The default params, with a max_tokens nobody asked for shrunk to the room the prompt leaves."""
        room = self.engine.max_model_len - len(ids)
        p = self.default_params
        if p.max_tokens is not None and 0 < room < p.max_tokens:
            p = dataclasses.replace(p, max_tokens=room)
        return p

    def _run(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[CompletionOutput]:
        ids: list[str] = []
        results: dict[str, CompletionOutput] = {}
        try:
            for p, sp in zip(prompts, params, strict=True):  # a bad prompt anywhere leaves nothing running
                ids.append(self.engine.add_request(p, sp))
                results[ids[-1]] = CompletionOutput(ids[-1], p)
            while any(r.finish_reason is None for r in results.values()):
                for out in self.engine.step():
                    if out.request_id in results:
                        results[out.request_id].add(out)
        finally:
            for rid, r in results.items():
                if r.finish_reason is None:
                    self.engine.abort(rid)
        return [results[rid] for rid in ids]

    def _stream_ids(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[RequestOutput]:
        rid = self.engine.add_request(prompt_ids, params)  # errors surface here, before the first next()
        return self._stream_loop(rid)

    def _stream_loop(self, rid: str) -> Iterator[RequestOutput]:
        done = False
        try:
            while not done:
                for out in self.engine.step():
                    if out.request_id == rid:
                        done = out.finished
                        yield out
        finally:
            if not done:
                self.engine.abort(rid)


def _mapped(stream: Iterator[RequestOutput], fn: Any) -> Iterator[RequestOutput]:
    """fn over a stream; leaving early closes the stream (which aborts its request) at once."""
    try:
        for out in stream:
            yield fn(out)
    finally:
        stream.close()  # type: ignore[attr-defined]


def _is_token_list(x: object) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, int) for t in x)


# Fallbacks a user can choose for a model that ships no template (e.g. a base model).
BUILTIN_TEMPLATES = {
    "chatml": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "plain": "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
             "{% if add_generation_prompt %}Assistant:{% endif %}",
}


def _read_template(chat_template: str | os.PathLike[str] | None) -> str | None:
    """A template is given inline, as a file path, or by a built-in name (chatml, plain)."""
    if chat_template is None:
        return None
    text = str(chat_template)
    if text in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[text]
    if "{%" in text or "{{" in text:
        return text
    path = Path(text)
    if not path.is_file():
        raise TemplateError(f"chat template file {path} does not exist (give a jinja file, the template text, "
                            f"or a built-in name: {', '.join(BUILTIN_TEMPLATES)})")
    return path.read_text(encoding="utf-8")


def load(model: str | os.PathLike[str] | None = None, *, device: str = "auto", dtype: str = "auto",
         chat_template: str | os.PathLike[str] | None = None, max_model_len: int | None = None,
         kv_cache_memory: int | None = None, quantize: str | None = None, double_quant: bool | None = None,
         compute_dtype: str | torch.dtype | None = None, prefix_caching: bool = True,
         max_num_seqs: int = 64, max_num_batched_tokens: int | None = None, act_bits: int | None = None,
         attention: str = "auto", quiet: bool = True) -> LLM:
    """Load a model, ready to generate: an alias ('smollm2-135m', the default), a local .gguf file or a
    Hugging Face model directory.

    quantize: "nf4" / "fp4" (bitsandbytes 4-bit; `double_quant` defaults to True, `compute_dtype` to
    bf16 on CPU) or "int8" (per-channel weight-only) re-quantizes every linear but the output head.
    prefix_caching: requests (and chat turns) sharing a prefix reuse its KV cache instead of recomputing it.
    max_num_seqs: requests decoding at once (more wait their turn). max_num_batched_tokens: tokens one
    engine step computes, prompt chunks included (default 256 on a CPU, 512 on an accelerator, at least
    max_num_seqs): smaller bounds how long running streams wait behind a long prompt.
    act_bits: how ember's packed-weight kernel quantizes activations, per block of 32: 8 (int8, llama.cpp's
    numerics: ~1.5x prefill, faster decode) or 16 (two int8 parts, ~16 bits: the exact mode, twice the
    integer work, closer to an fp32 reference token for token). Not given: $EMBER_ACT_BITS, else 8 for
    models with 1B+ weights in packed linears and 16 below (see packed.INT8_FROM_WEIGHTS for why).
    attention: "auto" (ember's Triton kernels on a CUDA GPU when triton is installed, else "torch": ember's
    CPU kernels / PyTorch SDPA), "torch" or "triton".
    """
    from ember.hub import DEFAULT_MODEL, resolve_model
    from ember.models.loader import build_model
    from ember.quant.packed import act_bits_of, default_act_bits, set_act_bits

    spec = _quant_spec(quantize, double_quant, compute_dtype)
    bits = act_bits_of(act_bits)
    t0 = time.perf_counter()
    dev = resolve_device(device)
    auto_kv = kv_cache_memory is None
    if auto_kv:  # engine settings first: a bad one fails before any loading
        kv_cache_memory = default_kv_bytes(dev)
    if max_num_batched_tokens is None:  # room for a token of every running request
        max_num_batched_tokens = default_step_tokens(dev)
        if isinstance(max_num_seqs, int):
            max_num_batched_tokens = max(max_num_batched_tokens, max_num_seqs)
    engine_cfg = EngineConfig(max_model_len=max_model_len, kv_cache_memory=kv_cache_memory,
                              max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                              prefix_caching=prefix_caching, attention=attention)
    resolve_attention(attention, dev)  # a bad value fails before any loading
    path = resolve_model(model or DEFAULT_MODEL, quiet=quiet)
    cfg, tensors, tokenizer, quantized, gen_defaults, ckpt_dtype = _open(Path(path))
    dt = resolve_dtype(dtype, dev, quantized=quantized or spec is not None, checkpoint=ckpt_dtype)
    if spec is not None and quantized:
        warnings.warn(f"{Path(path).name} is already quantized: re-quantizing its dequantized weights to "
                      f"{spec.method} (the two rounding errors add up)", stacklevel=2)
    if tensors is None:  # an architecture without a native model: transformers runs it
        from ember.models.hf_fallback import load_fallback

        if spec is not None:
            raise ParameterError("quantize= needs a native ember model; this one runs through transformers")
        net, cfg = load_fallback(Path(path), cfg, dt, dev)
        # ember's paged cache goes unused (block bookkeeping only), and so does prefix reuse
        engine_cfg.kv_cache_memory = min(kv_cache_memory, 64 << 20)
        engine_cfg.prefix_caching = False
    else:
        net = build_model(cfg, tensors, dt, dev, spec)
        set_act_bits(net, bits or default_act_bits(net))
        if auto_kv and dev.type == "cuda":  # sized once the weights are in: most of the GPU's free memory
            engine_cfg.kv_cache_memory = gpu_kv_bytes(dev, cfg, dt, engine_cfg)
    kv = KVCache(cfg, engine_cfg.kv_cache_memory, engine_cfg.block_size, dt, dev,  # type: ignore[arg-type]
                 engine_cfg.prefix_caching)
    engine = Engine(net, tokenizer, cfg, engine_cfg, kv)
    return_free_heap()
    return LLM(engine, tokenizer, cfg, Path(path), dev, dt, _read_template(chat_template),
               time.perf_counter() - t0, spec.method if spec else None, gen_defaults)


def return_free_heap() -> None:
    """Hand freed heap back to the OS. glibc keeps it mapped, and loading frees a lot: Gemma 3's tokenizer
    JSON parse leaves ~190 MB resident after a ~100 MB tokenizer is built."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


def _open(path: Path) -> tuple[ModelConfig, Any, Tokenizer, bool, dict[str, Any], torch.dtype | None]:
    """A GGUF file or a Hugging Face model directory -> (config, named tensors, tokenizer, quantized?,
    the model's sampling defaults, the checkpoint's dtype when it states one)."""
    from ember.hub import ember_home
    from ember.weights.hf import HFCheckpoint, is_hf_dir, read_json

    if is_hf_dir(path):
        ckpt = HFCheckpoint(path)
        gen = read_json(path / "generation_config.json", default={})
        eos = gen.get("eos_token_id")
        extra = [eos] if isinstance(eos, int) else list(eos or [])
        tok = Tokenizer.from_hf_dir(path, extra)
        if ckpt.arch is None:  # no native model: the transformers fallback builds it (tensors=None)
            return ckpt.hf, None, tok, False, generation_defaults(gen), ckpt.torch_dtype
        return (ckpt.config(), ckpt.tensors(), tok, ckpt.quant is not None, generation_defaults(gen),
                ckpt.torch_dtype)
    if path.is_dir():
        raise ParameterError(f"{path} is a directory without config.json: give a Hugging Face model directory "
                             "or a .gguf file")
    from ember.weights.gguf import GGUFFile

    gguf = GGUFFile(path)
    tok = Tokenizer.from_gguf_metadata(gguf.metadata, cache_dir=ember_home() / "tokenizers")
    return_free_heap()  # before the weights: the tokenizer's JSON parse leaves most of its peak behind
    return gguf.config(), gguf.tensors(), tok, gguf.is_quantized, {}, gguf.half_dtype


def generation_defaults(gen: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json -> SamplingParams fields, read as transformers reads them: without
    do_sample: true decoding is greedy; max_new_tokens bounds the reply (max_length is not used)."""
    out: dict[str, Any] = {}
    if not gen:
        return out
    if gen.get("max_new_tokens") is not None:
        out["max_tokens"] = gen["max_new_tokens"]
    if gen.get("repetition_penalty") is not None:
        out["repetition_penalty"] = gen["repetition_penalty"]
    if not gen.get("do_sample", False):
        out["temperature"] = 0.0
        return out
    for key in ("temperature", "top_p", "top_k", "min_p"):
        if gen.get(key) is not None:
            out[key] = gen[key]
    return out


def _quant_spec(quantize: str | None, double_quant: bool | None, compute_dtype: str | torch.dtype | None
                ) -> QuantSpec | None:
    """Validate the on-load quantization arguments before any file is read."""
    if quantize is None:
        stray = [n for n, v in (("double_quant", double_quant), ("compute_dtype", compute_dtype)) if v is not None]
        if stray:
            raise ParameterError(f"{stray[0]} only applies with quantize='nf4' or 'fp4' (no quantize was given)")
        return None
    spec = QuantSpec(quantize, double_quant, compute_dtype)
    if spec.method in ("nf4", "fp4"):
        from ember.quant.bnb import import_bnb

        import_bnb()  # fail now, not after reading the weights, when bitsandbytes is missing
    return spec
