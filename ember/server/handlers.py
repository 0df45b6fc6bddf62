"""The two generation endpoints: requests -> engine choices -> OpenAI responses or SSE chunks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Request

from ember.engine.outputs import RequestOutput
from ember.engine.sampler import TokenLogprobs
from ember.errors import ParameterError
from ember.server.choices import ChatChoice
from ember.server.engine_client import ScoredToken
from ember.server.protocol import APIError, ChatRequest, CompletionRequest
from ember.structured.chat import ChatPlan, plan_chat

if TYPE_CHECKING:
    from ember.server.app import Server


# ---- shared ---------------------------------------------------------------------------------------
def _usage(outs: list[RequestOutput | None]) -> dict[str, Any]:
    done = [o for o in outs if o is not None]
    prompt = done[0].usage.prompt_tokens if done else 0
    completion = sum(o.usage.completion_tokens for o in done)
    cached = done[0].usage.cached_tokens if done else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def _collect(srv: Server, rid: str, ids: list[str], request: Request, prompt_tokens: int,
                   choices: list[ChatChoice]) -> list[RequestOutput | None]:
    """Run every choice to the end (non-streaming), aborting all of them if the client goes away."""

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.05)
        for r in ids:
            srv.engine.abort(r)

    watcher = asyncio.create_task(watch())
    try:
        async for i, out in srv.merged(ids):
            choices[i].step(out)
    finally:
        watcher.cancel()
        srv.finish(rid, _lasts(choices), prompt_tokens)
    return _lasts(choices)


def _token_text(srv: Server, tid: int) -> str:
    return srv.model.tokenizer.decode([tid], skip_special_tokens=False)


def _chat_logprobs(srv: Server, lps: list[TokenLogprobs]) -> dict[str, Any]:
    def entry(tid: int, lp: float) -> dict[str, Any]:
        t = _token_text(srv, tid)
        return {"token": t, "logprob": lp, "bytes": list(t.encode())}

    return {"content": [{**entry(x.token_id, x.logprob), "top_logprobs": [entry(t, v) for t, v in x.top]}
                        for x in lps]}


# ---- /v1/chat/completions -------------------------------------------------------------------------
def _plan(srv: Server, req: ChatRequest) -> tuple[ChatPlan, list[int]]:
    """Tools, history and template -> the plan and the prompt; bad tools are a 400 naming the field."""
    kwargs = dict(req.chat_template_kwargs or {})
    reserved = sorted(set(kwargs) & {"chat_template", "messages", "add_generation_prompt", "tokenize", "conversation",
                                     "tools"})
    if reserved:
        raise APIError(400, f"chat_template_kwargs may not set {reserved[0]!r} (the server sets it)",
                       "chat_template_kwargs")
    try:
        plan = plan_chat([m.as_dict() for m in req.messages], req.tools, req.tool_choice, req.parallel_tool_calls,
                         srv.model.template, srv.model.tokenizer)
    except ParameterError as e:
        raise APIError(400, str(e), str(e).split(":", 1)[0].split(" ", 1)[0], "invalid_value") from None
    return plan, srv.model.encode_chat(plan.messages, **{**kwargs, **plan.template_kwargs})


def _chat_params(srv: Server, req: ChatRequest, plan: ChatPlan, prompt: list[int]) -> list[Any]:
    limit, nlp = req.limit(), req.num_logprobs()
    params = []
    for i in range(req.n):
        sp = req.sampling(limit, nlp, i, srv.model.generation_defaults)
        try:
            sp = plan.params(sp)
        except ParameterError as e:  # the tools' grammar, or a knob that cannot go with it
            raise APIError(400, str(e), "tools", "invalid_value") from None
        _fit_default(srv, sp, prompt, limit is not None)
        params.append(sp)
    return params


async def chat(srv: Server, req: ChatRequest, request: Request) -> Any:
    from ember.server.app import new_id, sse

    nlp = req.num_logprobs()
    plan, prompt = _plan(srv, req)
    params = _chat_params(srv, req, plan, prompt)
    rid, created = new_id("chatcmpl"), int(time.time())
    ids = await srv.start(rid, [prompt] * req.n, params, "tools" if plan.calls_tools else req.constraint_field)
    head = {"id": rid, "created": created, "model": srv.model_name}
    choices = [ChatChoice(i, plan.outputs()) for i in range(req.n)]
    if not req.stream:
        last = await _collect(srv, rid, ids, request, len(prompt), choices)
        body = [{"index": c.index, "message": c.message(),
                 "logprobs": _chat_logprobs(srv, c.logprobs) if nlp is not None else None,
                 "finish_reason": c.finish_reason} for c in choices]
        return {**head, "object": "chat.completion", "choices": body, "usage": _usage(last)}

    async def events() -> AsyncIterator[dict]:
        def chunk(i: int, delta: dict, finish: str | None = None, lp: Any = None) -> dict:
            ev = {**head, "object": "chat.completion.chunk",
                  "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]}
            return {**ev, "usage": None} if req.include_usage else ev

        for i in range(req.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for i, out in srv.merged(ids):
            delta = choices[i].step(out)
            if delta is not None:
                yield chunk(i, delta, lp=_chat_logprobs(srv, out.logprobs or []) if nlp is not None else None)
            if out.finished:
                yield chunk(i, {}, choices[i].finish_reason)
        if req.include_usage:
            yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(_lasts(choices))}

    return sse(events(), lambda: srv.finish(rid, _lasts(choices), len(prompt)))


def _lasts(choices: list[ChatChoice]) -> list[RequestOutput | None]:
    return [c.last for c in choices]


# ---- /v1/completions ------------------------------------------------------------------------------
LP = ScoredToken  # (token id, logprob or None for a prompt's first token, [(id, logprob), ...] best first)


def _as_lp(lps: list[TokenLogprobs]) -> list[LP]:
    return [(x.token_id, x.logprob, x.top) for x in lps]


def _completion_logprobs(srv: Server, lps: list[LP], offset: int) -> dict[str, Any]:
    """OpenAI's legacy logprobs; text_offset counts characters of the returned text from `offset`."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, lp, top in lps:
        t = _token_text(srv, tid)
        tokens.append(t)
        token_lps.append(lp)
        tops.append(None if lp is None else {_token_text(srv, i): v for i, v in top})
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _check_prompt(srv: Server, ids: list[int]) -> None:
    if not ids:
        raise APIError(400, "prompt is empty: give at least one token of text", "prompt")
    vocab = srv.model.tokenizer.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", "prompt")


def _fit_default(srv: Server, sp: Any, prompt: list[int], user_set: bool) -> None:
    """A max_tokens the model's generation_config chose (not the client) shrinks to the room left."""
    if not user_set and sp.max_tokens is not None:
        sp.max_tokens = max(1, min(sp.max_tokens, srv.model.max_model_len - len(prompt)))


async def completions(srv: Server, req: CompletionRequest, request: Request) -> Any:
    from ember.server.app import new_id, sse

    prompts = [srv.model.encode(p) for p in req.prompts()]
    for p in prompts:
        _check_prompt(srv, p)
    if req.max_tokens == 0 and not (req.echo and not req.stream):
        raise APIError(400, "max_tokens: 0 only makes sense with echo (scoring the prompt), not streamed",
                       "max_tokens")
    texts_in = [srv.model.tokenizer.decode(p) for p in prompts]
    rid, created = new_id("cmpl"), int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": srv.model_name}
    echo_lps: list[list[LP]] = [[] for _ in prompts]
    if req.echo and req.logprobs is not None:
        echo_lps = [await srv.engine.score(p, req.logprobs) for p in prompts]
    if req.max_tokens == 0:  # scoring only
        choices = [{"index": k, "text": texts_in[k], "finish_reason": "length",
                    "logprobs": _completion_logprobs(srv, echo_lps[k], 0) if req.logprobs is not None else None}
                   for k in range(len(prompts))]
        usage = sum(len(p) for p in prompts)
        return {**head, "choices": choices, "usage": {"prompt_tokens": usage, "completion_tokens": 0,
                                                      "total_tokens": usage}}
    # choice index = prompt index * n + i, as OpenAI numbers them
    flat = [(k, i) for k in range(len(prompts)) for i in range(req.n)]
    params = [req.sampling(req.max_tokens, req.logprobs, i, srv.model.generation_defaults) for _, i in flat]
    ids = await srv.start(rid, [prompts[k] for k, _ in flat], params, req.constraint_field)
    if not req.stream:
        runs = [ChatChoice(c, None) for c in range(len(flat))]
        last = await _collect(srv, rid, ids, request, sum(map(len, prompts)), runs)
        choices = []
        for c, (k, _) in enumerate(flat):
            prefix = texts_in[k] if req.echo else ""
            lp = None
            if req.logprobs is not None:
                lp = _completion_logprobs(srv, (echo_lps[k] if req.echo else []) + _as_lp(runs[c].logprobs), 0)
            choices.append({"index": c, "text": prefix + runs[c].content, "logprobs": lp,
                            "finish_reason": runs[c].finish_reason})
        usage = _usage(last)
        usage["prompt_tokens"] = sum(len(p) for p in prompts)
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {**head, "choices": choices, "usage": usage}

    last: list[RequestOutput | None] = [None] * len(flat)

    async def events() -> AsyncIterator[dict]:
        def chunk(c: int, text: str, finish: str | None = None, lp: Any = None) -> dict:
            ev = {**head, "choices": [{"index": c, "text": text, "logprobs": lp, "finish_reason": finish}]}
            return {**ev, "usage": None} if req.include_usage else ev

        offset = [0] * len(flat)  # characters of each choice's text sent so far (text_offset)
        if req.echo:
            for c, (k, _) in enumerate(flat):
                lp = _completion_logprobs(srv, echo_lps[k], 0) if echo_lps[k] else None
                yield chunk(c, texts_in[k], lp=lp)
                offset[c] = len(texts_in[k])
        async for c, out in srv.merged(ids):
            last[c] = out
            lp = _completion_logprobs(srv, _as_lp(out.logprobs or []), offset[c]) if req.logprobs is not None else None
            offset[c] += len(out.text)
            if out.text or out.logprobs:
                yield chunk(c, out.text, lp=lp)
            if out.finished:
                yield chunk(c, "", out.finish_reason)
        if req.include_usage:
            usage = _usage(last)
            usage["prompt_tokens"] = sum(len(p) for p in prompts)
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            yield {**head, "choices": [], "usage": usage}

    return sse(events(), lambda: srv.finish(rid, last, sum(map(len, prompts))))
