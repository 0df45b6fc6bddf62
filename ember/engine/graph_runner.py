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


class Graph(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor: ...
    def replay(self) -> None: ...


class CudaGraph:
    """torch.cuda.CUDAGraph with warm-up on a side stream; all buckets share one memory pool."""

    pool: object = None

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles, the allocator settles
            fn()
        torch.cuda.current_stream().wait_stream(side)
        if CudaGraph.pool is None:
            CudaGraph.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(self.graph, pool=CudaGraph.pool):
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
                 make_graph: Callable[[], Graph] = CudaGraph) -> None:
        from ember.engine.runner import split_segments  # (runner imports this module)

        self.model, self.kv, self.make_graph = model, kv, make_graph
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.max_batch = max_batch
        width = kv.blocks_needed(max_model_len)  # block-table columns: the longest sequence's blocks
        n = max_batch
        self.ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=device)
        self.tables = torch.zeros(n, width, dtype=torch.int32, device=device)
        self.ctx_lens = torch.zeros(n, dtype=torch.int32, device=device)
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

    @torch.inference_mode()
    def run(self, ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]]) -> torch.Tensor:
        """One decode row per sequence (B <= max_batch): fill the buffers, replay the bucket's graph (capturing
        it on first use) -> hidden [B, D]."""
        n = len(ids)
        b = self.bucket(n)
        assert b is not None, f"{n} rows exceed the largest bucket {self.max_batch}"
        from ember.engine.runner import block_table_tensor

        host = torch.tensor
        self.ids[:n].copy_(host(ids), non_blocking=True)
        self.positions[:n].copy_(host(positions), non_blocking=True)
        self.ctx_lens[:n].copy_(host(positions, dtype=torch.int32) + 1, non_blocking=True)
        self.slots[:n].copy_(host(slots), non_blocking=True)
        rows = block_table_tensor(tables)  # [n, longest]
        self.tables[:n, : rows.shape[1]].copy_(rows, non_blocking=True)
        if b > n:  # padding rows: no cache write, no key read
            self.ids[n:b].zero_()
            self.positions[n:b].zero_()
            self.slots[n:b].fill_(-1)
            self.ctx_lens[n:b].zero_()
        if b not in self.graphs:  # capturing records the step without running it (on a GPU): replay below
            g = self.make_graph()
            self.graphs[b] = (g, g.capture(lambda: self._forward(b)))
        self.graphs[b][0].replay()
        return self.graphs[b][1][:n]
