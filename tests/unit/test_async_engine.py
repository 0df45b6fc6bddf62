"""AsyncEngine: many concurrent streams over one engine thread; abort, errors and block accounting."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import ember
from ember import SamplingParams
from ember.engine.async_engine import AsyncEngine
from ember.errors import EmberError, ParameterError
from ember.server.engine_client import LocalEngine


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.fixture
def aeng(tiny_path):
    """An AsyncEngine over a fresh tiny model; its loop thread is stopped afterwards."""
    a = AsyncEngine(ember.load(tiny_path, dtype="float32").engine)
    yield a
    a.close()


async def collect(aeng: AsyncEngine, prompt: list[int], params: SamplingParams) -> list[int]:
    return [t async for out in aeng.generate(prompt, params) for t in out.token_ids]


def test_concurrent_streams_match_the_offline_api(tiny_path):
    llm = ember.load(tiny_path, dtype="float32")
    prompts = [[5 + i, 17, 200 - i, 33] for i in range(12)]
    expected = [o.token_ids for o in llm.generate(prompts, greedy(10))]
    aeng = AsyncEngine(llm.engine)
    start = llm.engine.kv.num_free_blocks

    async def main():
        return await asyncio.gather(*(collect(aeng, p, greedy(10)) for p in prompts))

    try:
        assert asyncio.run(main()) == expected
        assert llm.engine.kv.num_free_blocks == start
    finally:
        aeng.close()


def test_errors_reach_the_caller_and_leaving_early_aborts(aeng):
    eng = aeng.engine
    start = eng.kv.num_free_blocks

    async def main():
        with pytest.raises(ParameterError, match="vocabulary"):
            await collect(aeng, [1, 99999], greedy(4))
        n = 0
        async for _ in aeng.generate([1, 2, 3], greedy(200)):
            n += 1
            if n == 3:
                break  # the generator's cleanup aborts the request
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not eng.has_unfinished():
                break
        return n

    assert asyncio.run(main()) == 3
    assert not eng.has_unfinished() and eng.kv.num_free_blocks == start


def test_a_failing_step_fails_its_requests_not_the_loop(aeng, monkeypatch):
    real = aeng.engine.runner.run
    calls = {"n": 0}

    def flaky(batch, *rest):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(batch, *rest)

    monkeypatch.setattr(aeng.engine.runner, "run", flaky)

    async def main():
        with pytest.raises(RuntimeError, match="boom"):
            await collect(aeng, [1, 2, 3], greedy(4))
        return await collect(aeng, [1, 2, 3], greedy(4))  # the loop lives on

    assert len(asyncio.run(main())) == 4


def test_cancelled_callers_leave_the_loop_alive_and_nothing_running(aeng):
    eng = aeng.engine
    start = eng.kv.num_free_blocks

    def slow():
        time.sleep(0.3)
        return 1

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(aeng.call(slow), 0.05)  # gives up while the loop thread runs it
        for _ in range(5):  # callers that give up while their request is being added
            task = asyncio.create_task(aeng.add([1, 2, 3], greedy(200)))
            await asyncio.sleep(0)
            task.cancel()
        assert await aeng.call(lambda: 7) == 7  # the loop thread lives on
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not eng.has_unfinished():
                break

    asyncio.run(main())
    assert not eng.has_unfinished() and eng.kv.num_free_blocks == start
    assert not aeng._pending


def test_health_check_fails_when_a_step_hangs_or_the_loop_is_gone(aeng):
    """What a Ray Serve replica's check_health reports: a stuck engine loop gets the replica replaced."""
    import threading

    release = threading.Event()
    real_step = aeng.engine.step

    def hanging_step():
        release.wait(10)
        return real_step()

    aeng.check_health(0.05)  # idle: healthy
    aeng.engine.step = hanging_step

    async def main():
        rid = await aeng.add([5, 6, 7], greedy(2))
        await asyncio.sleep(0.3)
        with pytest.raises(RuntimeError, match="stuck"):
            aeng.check_health(0.2)
        aeng.check_health(30)  # a step under the limit is fine
        release.set()
        return [o async for o in aeng.stream(rid)]

    assert asyncio.run(main())[-1].finished
    aeng.check_health(0.2)
    aeng.close()
    with pytest.raises(RuntimeError, match="not running"):
        aeng.check_health(30)


def test_a_loader_runs_on_the_engine_thread_and_its_errors_reach_the_caller(tiny_path):
    """`ember serve` loads the model on the thread that then steps it: one OpenMP pool (see AsyncEngine)."""
    threads: dict[str, set[int]] = {"load": set(), "step": set()}

    def load():
        threads["load"].add(threading.get_ident())
        eng = ember.load(tiny_path, dtype="float32").engine
        step = eng.step
        eng.step = lambda: threads["step"].add(threading.get_ident()) or step()
        return eng

    a = AsyncEngine(load)
    try:
        assert asyncio.run(collect(a, [1, 2, 3], greedy(4)))
        assert threads["load"] == threads["step"] == {a._thread.ident} != {threading.get_ident()}
    finally:
        a.close()
    with pytest.raises(EmberError, match="no model here"):
        AsyncEngine(lambda: (_ for _ in ()).throw(EmberError("no model here")))
    local = LocalEngine(lambda: ember.load(tiny_path, dtype="float32"))
    try:
        assert local.llm.engine is local.aeng.engine and local.stats()[0].kv_blocks_total > 0
    finally:
        local.close()
