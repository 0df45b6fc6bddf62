"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket over static input buffers.

A decode step of B sequences is padded to the next bucket (1, 2, 4, 8, 16, 32, ...): the padding rows get
token 0 at position 0, cache slot -1 (the store kernel skips it) and context 0 (attention reads no key and
returns zeros), so they change nothing. The graph holds the model's body up to the final hidden states;
the head and the sampler run eagerly after it (structured-output masks and sampling vary per step). A
batch larger than the largest bucket, or any step with a prompt row, runs eagerly.

`EagerGraph` is a stand-in with the same interface that "replays" by calling the captured function on the
same static buffers: the bucketing, padding and buffer logic is tested with it on the CPU (the Triton
kernels then run in the interpreter).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from ember.engine.kv_cache import KVCache
from ember.layers.attention import ForwardContext, PagedMeta, SeqSpan

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
PAD = torch.tensor([[0], [0], [-1], [0]])  # a padding row's (token, position, cache slot, context length)


class Graph(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor: ...
    def replay(self) -> None: ...


class CudaGraph:
    """torch.cuda.CUDAGraph with a warm-up on a side stream, in the memory pool its runner's buckets share."""

    def __init__(self, pool: object) -> None:
        self.graph, self.pool = torch.cuda.CUDAGraph(), pool

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles, the allocator settles
            fn()
        torch.cuda.current_stream().wait_stream(side)
        # thread_local: CUDA calls from other threads (a server's) do not invalidate the capture
        with torch.cuda.graph(self.graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn()
        return out

    def replay(self) -> None:
        self.graph.replay()


class EagerGraph:
    """The CPU stand-in: replay recomputes into the captured output tensor from the same static buffers."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        self.fn = fn
        self.out = fn()
        return self.out

    def replay(self) -> None:
        self.out.copy_(self.fn())


def graphs_enabled(device: torch.device) -> bool:
    """On for the Triton path on a CUDA GPU; EMBER_CUDA_GRAPHS=0 turns them off (debugging, profiling)."""
    return device.type == "cuda" and os.environ.get("EMBER_CUDA_GRAPHS", "1") != "0"


class DecodeGraphs:
    def __init__(self, model: nn.Module, kv: KVCache, device: torch.device, max_batch: int, max_model_len: int,
                 make_graph: Callable[[], Graph] | None = None) -> None:
        from ember.engine.runner import split_segments  # (runner imports this module)

        if make_graph is None:
            pool = torch.cuda.graph_pool_handle()  # this runner's own: buckets share it, other engines do not
            make_graph = lambda: CudaGraph(pool)  # noqa: E731
        self.model, self.kv, self.make_graph = model, kv, make_graph
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.max_batch = n = max_batch
        width = kv.blocks_needed(max_model_len)  # block-table columns: the longest sequence's blocks
        pin = device.type == "cuda"
        # the step's inputs go up in one copy from one pinned buffer: ids, positions, cache slots, context lengths
        self.stage = torch.zeros(4, n, dtype=torch.long, pin_memory=pin)
        self.inputs = torch.zeros(4, n, dtype=torch.long, device=device)
        self.ids, self.positions, self.slots, self.ctx_lens = self.inputs.unbind(0)
        self.host_tables = torch.zeros(n, width, dtype=torch.int32, pin_memory=pin)
        self.row_tables: list[tuple[list[int], int] | None] = [None] * n  # (the list, its length) each row holds
        self.tables = torch.zeros(n, width, dtype=torch.int32, device=device)
        self.cu_q = torch.arange(n + 1, dtype=torch.int32, device=device)  # one query row per sequence
        hkv = kv.k[0].shape[0]
        self.segments = {b: split_segments(b, hkv, max_model_len) for b in self.buckets}
        self.graphs: dict[int, tuple[Graph, torch.Tensor]] = {}  # bucket -> (graph, its hidden-state output)

    def bucket(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def _forward(self, b: int) -> torch.Tensor:
        """The model body over the first b rows of the static buffers -> hidden [b, D]."""
        paged = PagedMeta(self.tables[:b], self.cu_q[: b + 1], self.ctx_lens[:b], self.kv.block_size,
                          self.segments[b])
        ctx = ForwardContext(positions=self.positions[:b], slot_mapping=self.slots[:b],
                             seqs=[SeqSpan(i, 1, 0, None) for i in range(b)],  # unread on the paged path
                             k_cache=self.kv.k, v_cache=self.kv.v, paged=paged)
        return self.model(self.ids[:b], ctx)

    def _graph(self, b: int) -> tuple[Graph, torch.Tensor]:
        if b not in self.graphs:
            g = self.make_graph()
            self.graphs[b] = (g, g.capture(lambda: self._forward(b)))
        return self.graphs[b]

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every bucket now, largest first (the pool then serves the smaller ones), on padding rows
        only — they write and read nothing — so no step later pays for a capture."""
        self.stage[:] = PAD
        self.inputs.copy_(self.stage, non_blocking=True)
        for b in reversed(self.buckets):
            self._graph(b)

    @torch.inference_mode()
    def run(self, ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]]) -> torch.Tensor:
        """One decode row per sequence (B <= max_batch): fill the buffers, replay the bucket's graph (capturing
        it on first use) -> hidden [B, D]."""
        n = len(ids)
        b = self.bucket(n)
        assert b is not None, f"{n} rows exceed the largest bucket {self.max_batch}"
        st = self.stage
        st[:, :n] = torch.tensor([ids, positions, slots, [p + 1 for p in positions]])
        if b > n:  # padding rows: token 0 at position 0, no cache write (slot -1), no key read (context 0)
            st[:, n:b] = PAD
        self.inputs.copy_(st, non_blocking=True)  # whole (contiguous, 32 B a row): rows past b go unread
        width = 0
        for i, t in enumerate(tables):  # rows are rewritten only when their table changed (grew, or is new)
            held = self.row_tables[i]
            if held is None or held[0] is not t or held[1] != len(t):
                self.host_tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
                self.row_tables[i] = (t, len(t))  # holding the list keeps its id from being reused
            width = max(width, len(t))
        self.tables[:n, :width].copy_(self.host_tables[:n, :width], non_blocking=True)
        g, out = self._graph(b)
        g.replay()  # (a first capture only recorded the step)
        return out[:n]
