"""The prefix-affinity routing policy of `ember serve --replicas`, without a Ray cluster: which replica a
prompt goes to, given what each replica ran and how loaded it is."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ember[ray]')")

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata  # noqa: E402
from ray.serve.request_router import PendingRequest  # noqa: E402

from ember.server import ray_router  # noqa: E402
from ember.server.ray_router import PrefixAffinityRouter, block_hashes, prompt_of  # noqa: E402

DEP = DeploymentID(name="EmberEngine", app_name="test")


class Replica:
    """What the router reads of a running replica."""

    def __init__(self, name: str, max_ongoing: int = 8) -> None:
        self.replica_id = ReplicaID(unique_id=name, deployment_id=DEP)
        self.max_ongoing_requests = max_ongoing


def request(prompt: list[int]) -> PendingRequest:
    return PendingRequest(args=[prompt, None, "rid"], kwargs={},
                          metadata=RequestMetadata(request_id="r", internal_request_id="r"))


@pytest.fixture
def router():
    """A router on its own event loop (as Ray Serve runs it)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    r = PrefixAffinityRouter(deployment_id=DEP, handle_source=DeploymentHandleSource.UNKNOWN,
                             use_replica_queue_len_cache=True)
    r.initialize_state(block_size=4, imbalance=2, max_entries=100)
    yield r
    asyncio.set_event_loop(None)
    loop.close()


def test_block_hashes_cover_whole_prefixes(router):  # the fixture gives PendingRequest its event loop
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(a) == 2  # full blocks only
    b = block_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4)
    assert a[0] != b[0] and a[1] != b[1]  # same second block, different prefix: a different hash
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4) == a
    assert prompt_of(request([3, 4])) == [3, 4] and prompt_of(None) is None
    assert prompt_of(PendingRequest(args=[], kwargs={}, metadata=RequestMetadata("r", "r"))) is None


def test_the_longest_cached_prefix_wins_then_the_least_loaded(router):
    a, b, c = Replica("a"), Replica("b"), Replica("c")
    conv = list(range(100, 120))
    assert router.preferred(conv, [a, b, c]) is None  # nothing routed yet: least loaded (Ray's probes)
    router.on_request_routed(request(conv[:8]), a.replica_id, None)  # a holds 2 blocks
    router.on_request_routed(request(conv[:12]), b.replica_id, None)  # b holds 3
    assert router.preferred(conv, [a, b, c]) is b
    assert router.preferred(conv[:9], [a, b, c]) in (a, b)  # both hold the 2 blocks
    router.on_new_queue_len_info(a.replica_id, 0)
    router.on_new_queue_len_info(b.replica_id, 1)
    assert router.preferred(conv[:9], [a, b, c]) is a  # a tie on the prefix: the less loaded
    assert router.preferred([7, 7, 7, 7, 7], [a, b, c]) is None  # an unseen prompt
    assert router.preferred(conv[:3], [a, b, c]) is None  # shorter than a block


def test_an_overloaded_owner_gives_way(router):
    a, b = Replica("a", max_ongoing=4), Replica("b", max_ongoing=4)
    conv = list(range(16))
    router.on_request_routed(request(conv), a.replica_id, None)
    router.on_new_queue_len_info(b.replica_id, 0)
    router.on_new_queue_len_info(a.replica_id, 1)
    assert router.preferred(conv, [a, b]) is a  # 1 more than the least loaded: within imbalance=2
    router.on_new_queue_len_info(a.replica_id, 2)
    assert router.preferred(conv, [a, b]) is None  # 2 more: the least-loaded replica takes it
    router.on_new_queue_len_info(b.replica_id, 4)
    router.on_new_queue_len_info(a.replica_id, 4)
    assert router.preferred(conv, [a, b]) is None  # full (max_ongoing_requests)


def test_choose_replicas_ranks_the_owner_first_and_backs_off_when_full(router):
    a, b = Replica("a"), Replica("b")
    conv = list(range(8))
    router.on_request_routed(request(conv), b.replica_id, None)
    pending = request(conv + [99])
    ranks = asyncio.get_event_loop().run_until_complete(router.choose_replicas([a, b], pending))
    assert ranks == [[b], [a, b]] and pending.routing_context.should_backoff
    assert asyncio.get_event_loop().run_until_complete(router.choose_replicas([a, b], request([5, 5, 5, 5]))) == [[a, b]]
    assert (router.affine, router.balanced) == (1, 1)


def test_a_dead_replica_is_forgotten_and_the_table_is_bounded(router):
    a, b = Replica("a"), Replica("b")
    conv = list(range(8))
    router.on_request_routed(request(conv), a.replica_id, None)
    router.on_replica_actor_died(a.replica_id)
    assert router.preferred(conv, [a, b]) is None and not router.owners
    for i in range(300):  # 300 prompts of 2 blocks each, 100 entries kept: the most recent
        router.on_request_routed(request([i] * 8), b.replica_id, None)
    assert len(router.owners) == 100
    assert router.preferred([299] * 8, [a, b]) is b and router.preferred([0] * 8, [a, b]) is None


def test_the_router_registers_for_metrics(router):
    assert ray_router.ROUTERS["test/EmberEngine"] is router
    assert router.replica_stats() == []  # no replicas yet
