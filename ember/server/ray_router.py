"""Prefix-affinity routing for ember's engine replicas, on Ray Serve's request-router API.

A request whose prompt starts like one routed before (the next turn of a conversation, a shared system
prompt) goes to a replica that ran that prefix, whose prefix cache holds those blocks (the longest match
first), while that replica is not overloaded: fewer than `imbalance` requests more than the least-loaded
replica, and below its max_ongoing_requests. Otherwise it goes to the least-loaded replica (Ray Serve's
queue-length probes).

The router keeps a bounded table from chained hashes of full prompt blocks (the engine's block size) to
the replicas that ran them. It lives in the process that holds the deployment handle (the ingress),
and also serves that process's /metrics: each replica's figures arrive as its routing stats.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

# '<app>/<deployment>' -> its router in this process (for /metrics: the replicas it sees and their stats)
ROUTERS: dict[str, PrefixAffinityRouter] = {}


def block_hashes(prompt: list[int], block_size: int) -> list[int]:
    """Chained hashes of the prompt's full blocks: hash i covers tokens [0, (i + 1) * block_size)."""
    out, h = [], 0
    for end in range(block_size, len(prompt) + 1, block_size):
        h = hash((h, tuple(prompt[end - block_size:end])))
        out.append(h)
    return out


def prompt_of(request: PendingRequest | None) -> list[int] | None:
    """The token ids a replica call carries: generate(prompt, ...) and score(prompt, ...) take them first."""
    if request is None or not request.args:
        return None
    first = request.args[0]
    return first if isinstance(first, list) and first and isinstance(first[0], int) else None


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, block_size: int = 16, imbalance: int = 4, max_entries: int = 200_000,
                         **_: Any) -> None:
        self.block_size, self.imbalance, self.max_entries = block_size, imbalance, max_entries
        # block hash -> the replicas that ran a prompt with that prefix; least recently used first
        self.owners: OrderedDict[int, set[ReplicaID]] = OrderedDict()
        self.affine = self.balanced = 0  # routing decisions, for tests and logs
        # Ray Serve may ship this class by value, with globals of its own: register in the real module
        from ember.server import ray_router

        ray_router.ROUTERS[f"{self._deployment_id.app_name}/{self._deployment_id.name}"] = self

    def _queue_len(self, r: RunningReplica) -> int:
        n = self.replica_queue_len_cache.get(r.replica_id)
        return 0 if n is None else n

    def preferred(self, prompt: list[int], candidates: list[RunningReplica]) -> RunningReplica | None:
        """Of the replicas holding the longest prefix of the prompt, the least loaded, if it can take more
        now. A chained hash covers the whole prefix, so holding block i means holding blocks 0..i."""
        by_id = {r.replica_id: r for r in candidates}
        matched: dict[ReplicaID, int] = {}
        for i, h in enumerate(block_hashes(prompt, self.block_size)):
            for rid in self.owners.get(h, ()):
                if rid in by_id:
                    matched[rid] = i + 1
        if not matched:
            return None
        least = min(self._queue_len(r) for r in candidates)
        for rid in sorted(matched, key=lambda r: (-matched[r], self._queue_len(by_id[r]))):
            r, n = by_id[rid], self._queue_len(by_id[rid])
            if n < r.max_ongoing_requests and n - least < self.imbalance:
                return r
        return None

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        prompt = prompt_of(pending_request)
        owner = self.preferred(prompt, candidate_replicas) if prompt else None
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # back off when every replica is full
        if owner is not None:
            self.affine += 1
            return [[owner], candidate_replicas]
        self.balanced += 1
        return [candidate_replicas]  # the least loaded of them takes it

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        prompt = prompt_of(pending_request)
        if not prompt:
            return
        for h in block_hashes(prompt, self.block_size):
            self.owners.setdefault(h, set()).add(replica_id)
            self.owners.move_to_end(h)
        while len(self.owners) > self.max_entries:
            self.owners.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for h in list(self.owners):
            holders = self.owners[h]
            holders.discard(replica_id)
            if not holders:
                del self.owners[h]

    def replica_stats(self) -> list[dict[str, Any]]:
        """The routing stats each live replica last reported (its EngineStats as a dict)."""
        return [dict(r.routing_stats) for r in list(self.curr_replicas.values()) if r.routing_stats]
