"""AsyncEngine: the engine loop runs in one background thread; every request gets its own async stream.

Callers (the HTTP server) never block their event loop on the model: adding and aborting requests are
commands the loop thread picks up between two steps, and outputs come back through each request's
asyncio queue. A bad request raises in its caller; an exception inside a step fails the requests that
were running (their streams raise it) and the loop carries on with the next ones. Once started, the
AsyncEngine owns its Engine: do not step that engine from elsewhere.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from ember.engine.engine import Engine
from ember.engine.outputs import RequestOutput
from ember.sampling_params import SamplingParams


class AsyncEngine:
    def __init__(self, engine: Engine | Callable[[], Engine]) -> None:
        """engine: the engine, or a function that builds it (loads the model), run on the loop thread.

        Build it there when you can: the thread that loaded the weights and the thread that steps the
        engine should be one. OpenMP (torch's and ember's kernels) keeps a thread pool per thread that
        runs parallel work; with two pools on a small machine, libgomp stops its workers spinning between
        parallel regions and every region pays a wake-up: a 135M model decodes at half speed (measured:
        ~90 instead of ~190 tok/s on 2 cores). A loader's exception is raised here."""
        self._commands: queue.SimpleQueue[tuple[str, Any, Future | None]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending: dict[str, asyncio.Queue] = {}  # added, not yet streamed (caller side)
        self._closed = False
        self._step_started: float | None = None  # monotonic time the running step began (health checks)
        built: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(engine, built), name="ember-engine", daemon=True)
        self._thread.start()
        self.engine: Engine = built.result()

    # ---- caller side (any event loop) -------------------------------------------------------------
    async def add(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; bad input (too long, bad ids, id in use) raises here. Then read `stream(id)`.
        A caller cancelled while waiting leaves nothing running behind it."""
        rid = request_id or f"req-{uuid.uuid4().hex[:16]}"
        constraint = None
        if params.structured is not None:  # compiled here, on a worker thread: never in the engine loop
            constraint = await asyncio.to_thread(self.engine.grammars.compile, params.structured)
        queue_: asyncio.Queue = asyncio.Queue()
        self._pending[rid] = queue_  # before the loop thread can push to it
        fut: Future = Future()
        self._commands.put(("add", (prompt_token_ids, params, rid, constraint, asyncio.get_running_loop(), queue_),
                                fut))
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            self.discard(rid)
            raise
        except BaseException:
            self._pending.pop(rid, None)
            raise

    async def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """The outputs of an added request; leaving early (break, cancel, disconnect) aborts it."""
        entry = self._pending.pop(request_id, None)
        if entry is None:
            raise KeyError(f"request {request_id!r} was not added here, or is already being streamed")
        finished = False
        try:
            while not finished:
                item = await entry.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """add + stream in one: errors of a bad request raise at the first iteration."""
        rid = await self.add(prompt_token_ids, params, request_id)
        async for out in self.stream(rid):
            yield out

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn in the loop thread between two steps (e.g. scoring a prompt on the engine's cache)."""
        fut: Future = Future()
        self._commands.put(("call", fn, fut))
        return await asyncio.wrap_future(fut)

    def abort(self, request_id: str) -> None:
        """Stop a request from anywhere; it is gone (blocks freed) before the next engine step. Its stream
        (read now or later) ends with finish_reason "abort"."""
        self._commands.put(("abort", request_id, None))

    def discard(self, request_id: str) -> None:
        """Abort a request whose stream will never be read (its caller gave up before streaming)."""
        self._pending.pop(request_id, None)
        self.abort(request_id)

    def close(self) -> None:
        """Stop the loop; callers still waiting get an error instead of hanging."""
        self._closed = True
        self._commands.put(("wake", None, None))
        self._thread.join(timeout=10)
        self.engine.grammars.close()
        for rid in list(self._streams):
            self._push(rid, RuntimeError("the engine was shut down"), last=True)

    def check_health(self, stuck_after_s: float) -> None:
        """Raise when the loop thread is gone or one step has run longer than stuck_after_s."""
        if self._closed or not self._thread.is_alive():
            raise RuntimeError("the engine loop is not running")
        began = self._step_started
        if began is not None and time.monotonic() - began > stuck_after_s:
            raise RuntimeError(f"the engine loop is stuck: one step has run for {time.monotonic() - began:.0f} s "
                               f"(limit {stuck_after_s:g} s)")

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting)

    # ---- the loop thread ------------------------------------------------------------------------------
    def _run(self, engine: Engine | Callable[[], Engine], built: Future) -> None:
        try:
            self.engine = engine() if callable(engine) and not isinstance(engine, Engine) else engine
        except BaseException as e:  # noqa: BLE001 - the constructor raises it in its caller
            built.set_exception(e)
            return
        built.set_result(self.engine)
        self._loop()

    def _loop(self) -> None:
        while not self._closed:
            # block for a command only when there is nothing to step
            block = not self.engine.has_unfinished()
            while True:
                try:
                    cmd = self._commands.get(block=block)
                except queue.Empty:
                    break
                try:
                    self._handle(*cmd)
                except Exception:  # noqa: BLE001 - a command must never take the loop thread down
                    pass
                block = False
            if self._closed or not self.engine.has_unfinished():
                continue
            self._step_started = time.monotonic()
            try:
                outs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - handed to every running request's caller
                self._fail_all(e)
                continue
            finally:
                self._step_started = None
            for out in outs:
                self._push(out.request_id, out, last=out.finished)

    def _handle(self, kind: str, arg: Any, fut: Future | None) -> None:
        if fut is not None and not fut.set_running_or_notify_cancel():
            return  # the caller was cancelled before we got here: nothing to do
        if kind == "add":
            prompt, params, rid, constraint, loop, stream = arg
            try:
                rid = self.engine.add_request(prompt, params, rid, constraint)
            except Exception as e:  # noqa: BLE001 - the caller's error to raise
                fut.set_exception(e)  # type: ignore[union-attr]
                return
            self._streams[rid] = (loop, stream)
            fut.set_result(rid)  # type: ignore[union-attr]
        elif kind == "call":
            try:
                fut.set_result(arg())  # type: ignore[union-attr]
            except Exception as e:  # noqa: BLE001 - the caller's error to raise
                fut.set_exception(e)  # type: ignore[union-attr]
        elif kind == "abort":
            out = self.engine.abort(arg)
            if out is not None:
                self._push(arg, out, last=True)

    def _push(self, rid: str, item: RequestOutput | BaseException, last: bool) -> None:
        entry = self._streams.pop(rid, None) if last else self._streams.get(rid)
        if entry is not None:
            loop, stream = entry
            try:
                loop.call_soon_threadsafe(stream.put_nowait, item)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
                pass

    def _fail_all(self, error: Exception) -> None:
        for rid in list(self._streams):
            self.engine.abort(rid)
            self._push(rid, error, last=True)
