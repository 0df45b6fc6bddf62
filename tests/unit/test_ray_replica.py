"""An engine replica's stream, without a Ray cluster: the first token alone (time to first token), then
`stream_interval` tokens per message, joined losslessly; the replica's counters."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ember[ray]')")

import ember  # noqa: E402
from ember import SamplingParams  # noqa: E402
from ember.engine.outputs import RequestOutput, Usage  # noqa: E402
from ember.errors import ParameterError  # noqa: E402
from ember.server.engine_client import LocalEngine  # noqa: E402
from ember.server.ray_app import EngineReplica, ServeArgs, application, build  # noqa: E402


def replica(llm, interval: int) -> EngineReplica:
    r = object.__new__(EngineReplica)  # its __init__ loads the model inside a Serve replica
    r.llm, r.engine = llm, LocalEngine(llm, replica="r1")
    r.stuck_after_s, r.stream_interval = 30.0, interval
    return r


def test_joined_outputs_lose_nothing():
    a = RequestOutput("r", "Hel", [1], False, None, Usage(3, 1), logprobs=None)
    b = RequestOutput("r", "lo", [2, 3], True, "stop", Usage(3, 3), logprobs=None)
    j = a.joined(b)
    assert (j.text, j.token_ids, j.finished, j.finish_reason, j.usage, j.logprobs) == \
        ("Hello", [1, 2, 3], True, "stop", Usage(3, 3), None)


@pytest.mark.parametrize("interval", [1, 3])
def test_replica_streams_every_interval_tokens(tiny_path, interval):
    llm = ember.load(tiny_path, dtype="float32")
    expected = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    r = replica(llm, interval)

    async def main():
        return [x async for x in r.generate([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=10,
                                                                          ignore_eos=True), "q1")]

    try:
        items = asyncio.run(main())
        r.check_health()
    finally:
        r.engine.close()
    assert items[0] == "r1"  # admitted, by this replica
    outs = items[1:]
    assert [t for o in outs for t in o.token_ids] == expected.token_ids
    assert "".join(o.text for o in outs) == expected.text
    assert len(outs[0].token_ids) == 1 and outs[-1].finished
    assert all(len(o.token_ids) == interval for o in outs[1:-1])
    stats = r.record_routing_stats()
    assert stats["replica"] == "r1" and stats["requests"] == 1 and stats["completion_tokens"] == 10
    assert stats["running"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_application_settings():
    app = application(ServeArgs(model="m.gguf", replicas=2, max_replicas=4, replica_cpus=1, stream_interval=2))
    ingress = app._bound_deployment
    engine = ingress.init_args[0]._bound_deployment
    scaling = engine._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (2, 4)
    assert engine.ray_actor_options["num_cpus"] == 1 and engine.init_args[2:] == (1, 120, 2)
    assert ingress.init_args[1] == "m"  # the served name: the file name without .gguf
    with pytest.raises(ParameterError, match="replicas"):
        build({"model": "m.gguf", "replicas": 0})
    with pytest.raises(ParameterError, match="colour"):
        build({"model": "m.gguf", "colour": "red"})


def test_a_max_below_the_min_is_refused_not_ignored():
    with pytest.raises(ParameterError, match="max_replicas 2 is below replicas 3"):
        build({"model": "m.gguf", "replicas": 3, "max_replicas": 2})
