"""`ember serve`: an OpenAI-compatible HTTP server (FastAPI) over the async engine.

Endpoints: GET / (the chat page, server/page.py), GET /health, GET /v1/models, POST /v1/chat/completions,
POST /v1/completions, GET /metrics, POST /v1/requests/{id}/cancel, and the conversation store under
/v1/conversations (server/conversations.py).
Errors come in OpenAI's shape; a client that goes away has its requests aborted before the next engine
step, so their KV blocks are free again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ember.engine.outputs import RequestOutput
from ember.errors import ContextLengthError, EmberError, ParameterError, TemplateError
from ember.llm import LLM
from ember.prompts import Frontend
from ember.sampling_params import SamplingParams
from ember.server import conversations as convs
from ember.server import handlers
from ember.server.engine_client import EngineBusy, EngineClient, EngineUnavailable, LocalEngine
from ember.server.metrics import Metrics
from ember.server.page import mount_page
from ember.server.protocol import APIError, ChatRequest, CompletionRequest, parse


class Server:
    """What the endpoints share: the model's front end (tokenizer, template, defaults), the engine
    client, the live requests and the counters."""

    def __init__(self, model: Frontend, engine: EngineClient, model_name: str, api_key: str | None) -> None:
        self.model, self.engine, self.model_name, self.api_key = model, engine, model_name, api_key
        self.metrics = Metrics()
        self.live: dict[str, list[str]] = {}  # response id -> engine request ids of its choices

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist: this server serves '{self.model_name}'",
                           "model", "model_not_found")

    async def start(self, rid: str, prompts: list[list[int]], params: list[SamplingParams],
                    constraint: str = "response_format") -> list[str]:
        """Add one engine request per choice; any failure (context, bad ids, a grammar the vocabulary cannot
        take) aborts the others, then raises a 400 naming the field. constraint: the field the
        structured-output constraint came from."""
        ids: list[str] = []
        try:
            for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
                ids.append(await self.engine.add(p, sp, f"{rid}-{i}"))
        except (ContextLengthError, ParameterError) as e:
            for r in ids:
                self.engine.discard(r)
            text = str(e)
            param = "logit_bias" if text.startswith("logit_bias") else constraint \
                if text.startswith("SamplingParams.structured") else "messages" if rid.startswith("chatcmpl") \
                else "prompt"
            raise APIError(400, text, param,
                           "context_length_exceeded" if isinstance(e, ContextLengthError) else "invalid_value") \
                from None
        self.live[rid] = ids
        return ids

    def finish(self, rid: str, outs: list[RequestOutput | None], prompt_tokens: int) -> None:
        """The response is over (or its client left before streaming began): no choice may run on.
        prompt_tokens: of every distinct prompt of the response (n choices share one)."""
        for r in self.live.pop(rid, []):
            self.engine.discard(r)  # a no-op for the finished ones
        done = [o for o in outs if o is not None]
        self.metrics.completion_tokens += sum(o.usage.completion_tokens for o in done)
        self.metrics.prompt_tokens += prompt_tokens
        self.metrics.cached_tokens += max((o.usage.cached_tokens for o in done), default=0)

    async def merged(self, ids: list[str]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) of all choices as they come; leaving early aborts every choice."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, rid: str) -> None:
            try:
                async for out in self.engine.stream(rid):
                    await queue.put((i, out))
            except Exception as e:  # noqa: BLE001 - re-raised in the consumer
                await queue.put((i, e))
            await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(ids)]
        left = len(ids)
        try:
            while left:
                i, item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()  # a cancelled pump's stream aborts its request (and finish() discards them all)


def create_app(llm: LLM, model_name: str, api_key: str | None = None, ui: bool = True) -> FastAPI:
    """The server of one in-process engine (`ember serve`)."""
    return build_app(llm.frontend(), LocalEngine(llm), model_name, api_key, ui)


def build_app(model: Frontend, engine: EngineClient, model_name: str, api_key: str | None = None,
              ui: bool = True) -> FastAPI:
    """The OpenAI app over any engine client: in-process, or Ray Serve replicas (ember.server.ray_app).
    ui: the chat page at / (server/page.py)."""
    srv = Server(model, engine, model_name, api_key)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        srv.engine.close()

    app = FastAPI(title="ember", lifespan=lifespan)
    app.state.server = srv

    def guarded(endpoint: str, fn: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Awaitable[Any]]:
        """Auth, JSON errors in OpenAI's shape, and the request counters, around one endpoint."""

        async def run(request: Request) -> Any:
            try:
                if srv.api_key and request.headers.get("authorization") != f"Bearer {srv.api_key}":
                    raise APIError(401, "Incorrect API key provided: send 'Authorization: Bearer <key>'",
                                   code="invalid_api_key")
                res = await fn(request)
                srv.metrics.requests[(endpoint, "ok")] += 1
                return res
            except APIError as e:
                srv.metrics.requests[(endpoint, str(e.status))] += 1
                return JSONResponse(e.body(), status_code=e.status)
            except (EngineUnavailable, EngineBusy) as e:
                srv.metrics.requests[(endpoint, "503")] += 1
                return JSONResponse(unavailable(e).body(), 503)
            except TemplateError as e:
                srv.metrics.requests[(endpoint, "400")] += 1
                return JSONResponse(APIError(400, f"chat template: {e}", "messages", "template_error").body(), 400)
            except EmberError as e:  # bad values caught by ember's own checks (SamplingParams, ...)
                srv.metrics.requests[(endpoint, "400")] += 1
                return JSONResponse(APIError(400, str(e), _param_of(e), "invalid_value").body(), 400)
            except Exception as e:  # noqa: BLE001 - an engine failure: this request fails, the server lives
                srv.metrics.requests[(endpoint, "500")] += 1
                return JSONResponse(APIError(500, f"{type(e).__name__}: {e}", kind="server_error").body(), 500)

        return run

    async def body_of(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON in the request body: {e}", code="invalid_json") from None

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": srv.model_name}

    async def models(request: Request) -> dict:
        return {"object": "list", "data": [{"id": srv.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "ember"}]}

    async def metrics(request: Request) -> PlainTextResponse:
        return PlainTextResponse(srv.metrics.render(srv.engine.stats()), media_type="text/plain; version=0.0.4")

    async def cancel(request: Request) -> dict:
        rid = request.path_params["request_id"]
        ids = srv.live.get(rid)
        if ids is None:
            raise APIError(404, f"no running request with id {rid!r}", "request_id", "not_found")
        for r in ids:
            srv.engine.abort(r)
        return {"id": rid, "object": "request.cancelled", "cancelled": True}

    async def chat(request: Request) -> Any:
        req = parse(ChatRequest, await body_of(request))
        srv.check_model(req.model)
        return await handlers.chat(srv, req, request)

    async def completions(request: Request) -> Any:
        req = parse(CompletionRequest, await body_of(request))
        srv.check_model(req.model)
        return await handlers.completions(srv, req, request)

    async def conversations(request: Request) -> Any:
        if request.method == "POST":
            return await convs.create(parse(convs.NewConversation, await body_of(request)))
        return await convs.list_(request.query_params.get("q"), request.query_params.get("limit", "50"))

    async def conversation(request: Request) -> Any:
        cid = request.path_params["cid"]
        if request.method == "PATCH":
            return await convs.update(cid, parse(convs.Update, await body_of(request)))
        if request.method == "DELETE":
            return await convs.delete(cid)
        return await convs.get(cid)

    async def conversation_messages(request: Request) -> Any:
        return await convs.append(request.path_params["cid"], parse(convs.NewMessages, await body_of(request)))

    app.add_api_route("/v1/conversations", guarded("conversations", conversations), methods=["GET", "POST"])
    app.add_api_route("/v1/conversations/{cid}", guarded("conversations", conversation),
                      methods=["GET", "PATCH", "DELETE"])
    app.add_api_route("/v1/conversations/{cid}/messages", guarded("conversations", conversation_messages),
                      methods=["POST"])
    app.add_api_route("/v1/models", guarded("models", models), methods=["GET"])
    app.add_api_route("/metrics", guarded("metrics", metrics), methods=["GET"])
    app.add_api_route("/v1/requests/{request_id}/cancel", guarded("cancel", cancel), methods=["POST"])
    app.add_api_route("/v1/chat/completions", guarded("chat", chat), methods=["POST"])
    app.add_api_route("/v1/completions", guarded("completions", completions), methods=["POST"])
    if ui:
        mount_page(app)
    return app


def _param_of(e: Exception) -> str | None:
    """'SamplingParams.top_p=...' -> 'top_p'."""
    text = str(e)
    if "SamplingParams." in text:
        return text.split("SamplingParams.", 1)[1].split("=", 1)[0]
    return None


def unavailable(e: Exception) -> APIError:
    code = "engine_unavailable" if isinstance(e, EngineUnavailable) else "busy"
    return APIError(503, str(e), code=code, kind="server_error")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(events: AsyncIterator[dict], on_close: Callable[[], None]) -> StreamingResponse:
    """Server-sent events: one `data: {json}` per event, then `data: [DONE]`."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for ev in events:
                yield b"data: " + json.dumps(ev, ensure_ascii=False).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 - the status is sent already: say it in the stream
            err = (unavailable(e) if isinstance(e, (EngineUnavailable, EngineBusy))
                   else APIError(500, f"{type(e).__name__}: {e}", kind="server_error")).body()
            yield b"data: " + json.dumps(err).encode() + b"\n\n"
        finally:
            on_close()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
