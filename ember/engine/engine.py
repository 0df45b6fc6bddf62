"""Engine: add requests, step (schedule -> run -> postprocess), abort. Every surface drives this."""

from __future__ import annotations

import logging

from torch import nn

from ember.config import EngineConfig, ModelConfig
from ember.engine.detokenizer import IncrementalDetokenizer
from ember.engine.graph_runner import BUCKETS, DecodeGraphs, graphs_enabled
from ember.engine.kv_cache import KVCache
from ember.engine.outputs import RequestOutput, Usage
from ember.engine.request import Request
from ember.engine.runner import ModelRunner, resolve_attention
from ember.engine.sampler import Sampler, SamplingState
from ember.engine.scheduler import Scheduler, SchedulerOutput
from ember.errors import ContextLengthError, ParameterError
from ember.models.hf_fallback import TransformersFallback
from ember.sampling_params import SamplingParams
from ember.structured.backend import Constraint, GrammarBackend, RowMasks
from ember.tokenizer import Tokenizer

log = logging.getLogger("ember")


class Engine:
    def __init__(self, model: nn.Module, tokenizer: Tokenizer, model_config: ModelConfig,
                 engine_config: EngineConfig, kv: KVCache) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, engine_config
        self.max_model_len = engine_config.context(model_config)
        self.kv = kv
        self.scheduler = Scheduler(engine_config, kv)
        device = kv.k[0].device
        self.runner = ModelRunner(model, kv, device, resolve_attention(engine_config.attention, device))
        if self.runner.triton and graphs_enabled(device) and not isinstance(model, TransformersFallback):
            self.runner.graphs = DecodeGraphs(model, kv, device, min(engine_config.max_num_seqs, BUCKETS[-1]),
                                              self.max_model_len)
            self.runner.graphs.capture_all()
        self.sampler = Sampler()
        self.grammars = GrammarBackend(tokenizer, model_config.vocab_size, overlap=self.runner.device.type != "cpu")
        self.requests: dict[str, Request] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self.num_tokens_computed = 0  # positions run through the model, all requests (prefix reuse shows here)

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: str | None = None, constraint: Constraint | None = None) -> str:
        """Queue a request. A structured one brings its `constraint` compiled off the step loop
        (`self.grammars.compile(params.structured)` in a worker thread); without one it compiles here."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ParameterError("the prompt is empty: give at least one token of text")
        room = self.max_model_len - n
        if room < 1:
            raise ContextLengthError(
                f"the prompt has {n} tokens but the context holds {self.max_model_len}; shorten the prompt")
        if params.max_tokens is not None and params.max_tokens > room:
            raise ContextLengthError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} tokens, "
                f"over the context of {self.max_model_len}; lower max_tokens to {room} or shorten the prompt")
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if self.kv.blocks_needed(n + max_tokens) > self.kv.num_blocks:
            raise ContextLengthError(
                f"this request needs up to {n + max_tokens} tokens of KV cache but it holds "
                f"{self.kv.capacity_tokens}; give the cache more memory or lower max_tokens")
        vocab = self.tokenizer.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ParameterError(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            bad = sorted(t for t in params.logit_bias if t >= vocab)
            raise ParameterError(f"logit_bias token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        eos = frozenset() if params.ignore_eos else self.tokenizer.eos_token_ids
        kwargs = {"request_id": request_id} if request_id else {}
        req = Request(list(prompt_token_ids), params, max_tokens, eos | frozenset(params.stop_token_ids), **kwargs)
        if req.request_id in self.requests:
            raise ParameterError(f"request id {req.request_id!r} is already in use")
        if params.structured is not None:
            req.constraint = constraint or self.grammars.compile(params.structured)
        self.requests[req.request_id] = req
        self._detok[req.request_id] = IncrementalDetokenizer(
            self.tokenizer, req.prompt_token_ids, stop=params.stop, skip_special_tokens=params.skip_special_tokens)
        self.scheduler.add(req)
        return req.request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request at once and free its blocks; returns its final (empty) output."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.finish(req, "abort")
        self._release(request_id)
        self._detok.pop(request_id, None)
        return RequestOutput(request_id, "", [], True, "abort", Usage(req.num_prompt_tokens, req.num_output_tokens))

    def _release(self, request_id: str) -> None:
        release = getattr(self.model, "release", None)  # models that keep per-request state (the fallback)
        if release is not None:
            release(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        masks = self._masks(batch)  # constrained rows' token masks (filled while a GPU runs the model)
        logits = self.runner.run(batch, masks)
        self.scheduler.commit(batch)
        self.num_tokens_computed += batch.num_tokens
        return self._postprocess(batch, logits, masks)

    def _masks(self, batch: SchedulerOutput) -> RowMasks | None:
        return self.grammars.masks([s.request.constraint for s in batch.seqs if s.samples])

    def _postprocess(self, batch: SchedulerOutput, logits, masks: RowMasks | None = None) -> list[RequestOutput]:
        sampling = [s.request for s in batch.seqs if s.samples]
        if not sampling:
            return []
        states = [SamplingState(r.params, r.prompt_token_ids, r.output_token_ids, r.generator, r.eos_token_ids)
                  for r in sampling]
        sampled = self.sampler(logits, states, masks.get(logits.device) if masks is not None else None)
        outs = []
        for req, tok, lp in zip(sampling, sampled.token_ids, sampled.logprobs, strict=True):
            outs.append(self._append(req, tok, lp))
        return outs

    def _append(self, req: Request, tok: int, lp) -> RequestOutput:
        req.output_token_ids.append(tok)
        detok = self._detok[req.request_id]
        reason = None
        con = req.constraint
        if con is not None and con.failed:  # llguidance hit a limit: the output is not what was asked for
            log.warning("request %s: structured output stopped: %s", req.request_id, con.error)
            reason, text = "abort", detok.finish()
        elif con is not None and tok in con.eos_ids:
            reason, text = "stop", detok.finish()  # allowed only where the grammar is complete
        elif tok in req.eos_token_ids and req.num_output_tokens > req.params.min_tokens - 1:
            reason, text = "stop", detok.finish()  # the terminator itself is not part of the text
        else:
            text = detok.add(tok)
            if con is not None and not con.accept(tok):
                log.warning("request %s: structured output stopped: %s", req.request_id, con.error)
                text, reason = text + detok.finish(), "abort"
            elif detok.stopped:
                reason = "stop"
            elif con is not None and con.done:  # nothing but the end may follow: no step spent sampling it
                text += detok.finish()
                reason = "stop"
            elif req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
                text += detok.finish()
                reason = "stop" if detok.stopped else "length"  # held-back text may complete a stop string
        usage = Usage(req.num_prompt_tokens, req.num_output_tokens, req.num_cached_tokens)
        if reason is not None:
            self.scheduler.finish(req, reason)
            self._release(req.request_id)
            del self.requests[req.request_id], self._detok[req.request_id]
        return RequestOutput(req.request_id, text, [tok], reason is not None, reason, usage,
                             None if lp is None else [lp])
