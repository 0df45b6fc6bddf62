"""`RayEngine`: the server's engine client over a Ray Serve handle to ember's engine replicas.

Each request is one streaming call to a replica's `generate`: its first item says the request was admitted
(a bad one raises there, as it would in-process), then come the replica's RequestOutputs. Faults become
ember's errors: a replica that dies mid-request ends the stream with EngineUnavailable (a 503 or an SSE
error event), never a hang; leaving a stream early cancels the call, and Ray Serve hands the cancellation
to the replica, whose engine aborts the request and frees its blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import BackPressureError, RequestCancelledError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from ember.engine.outputs import RequestOutput, Usage
from ember.sampling_params import SamplingParams
from ember.server.engine_client import EngineBusy, EngineStats, EngineUnavailable, ScoredToken
from ember.server.ray_router import ROUTERS


def _translated(e: BaseException) -> BaseException:
    """A Ray error -> the error ember raises in-process (the replica's own), or EngineUnavailable/Busy."""
    if isinstance(e, RayTaskError) and isinstance(e.cause, Exception) and not isinstance(e.cause, RayError):
        return e.cause  # raised by ember inside the replica: a bad request, a too-long prompt
    if isinstance(e, BackPressureError):
        return EngineBusy(f"every engine replica's queue is full ({e}); retry")
    if isinstance(e, RayError):
        return EngineUnavailable(f"the engine replica running this request is gone ({type(e).__name__}); retry")
    return e


class RayEngine:
    def __init__(self, handle: DeploymentHandle, deployment: str, admit_timeout_s: float = 120.0) -> None:
        self.handle, self.deployment, self.admit_timeout_s = handle, deployment, admit_timeout_s
        self._streaming = handle.options(stream=True)
        self._calls: dict[str, tuple[DeploymentResponseGenerator, int]] = {}  # request id -> (call, prompt len)
        self._aborted: set[str] = set()

    async def add(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str) -> str:
        call = self._streaming.generate.remote(prompt_token_ids, params, request_id)
        try:
            await asyncio.wait_for(call.__anext__(), self.admit_timeout_s)  # the replica's id: admitted
        except asyncio.TimeoutError:
            call.cancel()
            raise EngineUnavailable(f"no engine replica took the request within {self.admit_timeout_s:g} s; "
                                    "retry") from None
        except asyncio.CancelledError:
            call.cancel()
            raise
        except StopAsyncIteration:
            raise EngineUnavailable("the engine replica ended the request before admitting it; retry") from None
        except Exception as e:  # noqa: BLE001 - translated for the caller
            raise _translated(e) from None
        self._calls[request_id] = (call, len(prompt_token_ids))
        return request_id

    async def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        call, prompt_len = self._calls[request_id]
        last, finished = None, False
        try:
            async for out in call:
                last, finished = out, out.finished
                yield out
            if not finished:
                raise EngineUnavailable("the engine replica ended the stream before the request finished; retry")
        except RequestCancelledError:
            if request_id not in self._aborted:
                raise EngineUnavailable("the request was cancelled on its engine replica; retry") from None
            finished = True  # abort(): end as the in-process engine does, with finish_reason "abort"
            usage = last.usage if last is not None else Usage(prompt_len, 0)
            yield RequestOutput(request_id, "", [], True, "abort", usage)
        except RayError as e:
            raise _translated(e) from None
        finally:
            self._calls.pop(request_id, None)
            self._aborted.discard(request_id)
            if not finished:
                call.cancel()

    def abort(self, request_id: str) -> None:
        entry = self._calls.get(request_id)
        if entry is not None:
            self._aborted.add(request_id)
            entry[0].cancel()

    def discard(self, request_id: str) -> None:
        entry = self._calls.pop(request_id, None)
        if entry is not None:
            entry[0].cancel()

    async def score(self, prompt_token_ids: list[int], top_n: int) -> list[ScoredToken]:
        try:
            return await self.handle.score.remote(prompt_token_ids, top_n)
        except RayError as e:
            raise _translated(e) from None

    def stats(self) -> list[EngineStats]:
        router = ROUTERS.get(self.deployment)
        return [] if router is None else [EngineStats(**d) for d in router.replica_stats()]

    def close(self) -> None:
        for call, _ in list(self._calls.values()):
            call.cancel()
        self._calls.clear()

