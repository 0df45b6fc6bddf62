"""ModelRunner: turns a scheduled batch into flat tensors, runs the model, returns next-token logits."""

from __future__ import annotations

import torch
from torch import nn

from ember.engine.graph_runner import DecodeGraphs
from ember.engine.kv_cache import KVCache
from ember.engine.scheduler import SchedulerOutput
from ember.layers.attention import ForwardContext, PagedMeta, SeqSpan
from ember.structured.backend import RowMasks


class ModelRunner:
    def __init__(self, model: nn.Module, kv: KVCache, device: torch.device, attention: str = "torch") -> None:
        """attention: "torch" (ember's CPU kernels / SDPA) or "triton" (the GPU kernels; see resolve_attention)."""
        self.model, self.kv, self.device = model, kv, device
        self.triton = attention == "triton"
        self.graphs: DecodeGraphs | None = None  # decode replayed from CUDA graphs (set by the engine)

    @torch.inference_mode()
    def run(self, batch: SchedulerOutput, masks: RowMasks | None = None) -> torch.Tensor | None:
        """Logits [B, V] (fp32) for the scheduled sequences that sample this step, in batch order. masks: the
        structured-output rows' allowed tokens, so the head's exact candidates are allowed ones."""
        if not batch.seqs:
            return None
        g = self.graphs
        if g is not None and len(batch.seqs) <= g.max_batch and all(s.num_tokens == 1 for s in batch.seqs):
            return self._replay_decode(batch, g, masks)
        ids: list[int] = []
        positions: list[int] = []
        slots, spans, last_rows = [], [], []
        tables = self.kv.table_slots([s.request.block_table for s in batch.seqs], self.device)
        for s, table in zip(batch.seqs, tables, strict=True):
            req, end = s.request, s.start + s.num_tokens
            q_start = len(ids)
            ids.extend(req.all_token_ids[s.start : end])
            positions.extend(range(s.start, end))
            # one slot table per request: the new tokens' slots are its tail; a step that holds the whole
            # context needs no cache read (plain causal attention)
            ctx_slots = table[:end]  # [end]
            slots.append(ctx_slots[s.start :])
            kv_slots = None if s.start == 0 else ctx_slots
            spans.append(SeqSpan(q_start, s.num_tokens, end, kv_slots))
            if s.samples:
                last_rows.append(len(ids) - 1)
            s.request.num_computed_tokens = end
        ctx = ForwardContext(
            positions=torch.tensor(positions, device=self.device),
            slot_mapping=torch.cat(slots),
            seqs=spans,
            k_cache=self.kv.k,
            v_cache=self.kv.v,
            request_ids=[s.request.request_id for s in batch.seqs],
            paged=self._paged([s.request.block_table for s in batch.seqs], spans),
        )
        hidden = self.model(torch.tensor(ids, dtype=torch.long, device=self.device), ctx)  # [T, D]
        return self._logits(hidden, last_rows, masks)

    def _replay_decode(self, batch: SchedulerOutput, g: DecodeGraphs, masks: RowMasks | None) -> torch.Tensor | None:
        """Every sequence decodes one token: the step's inputs straight from the requests (slots on the host,
        no slot tables), replayed from the bucket's graph."""
        bs = self.kv.block_size
        ids, positions, slots, last_rows = [], [], [], []
        for i, s in enumerate(batch.seqs):
            req, p = s.request, s.start
            ids.append(req.all_token_ids[p])
            positions.append(p)
            slots.append(req.block_table[p // bs] * bs + p % bs)
            if s.samples:
                last_rows.append(i)
            req.num_computed_tokens = p + 1
        hidden = g.run(ids, positions, slots, [s.request.block_table for s in batch.seqs])
        return self._logits(hidden, last_rows, masks)

    def _logits(self, hidden: torch.Tensor, last_rows: list[int], masks: RowMasks | None) -> torch.Tensor | None:
        if not last_rows:
            return None
        rows = torch.tensor(last_rows, device=self.device)
        allowed = masks.get(self.device) if masks is not None else None
        return self.model.compute_logits(hidden.index_select(0, rows), allowed)  # [B, V]

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [S, V] (fp32) at every position of one sequence (perplexity, prompt logprobs)."""
        blocks = self.kv.allocate(self.kv.blocks_needed(len(token_ids)))
        try:
            n = len(token_ids)
            spans = [SeqSpan(0, n, n, None)]
            ctx = ForwardContext(positions=torch.arange(n, device=self.device),
                                 slot_mapping=self.kv.table_slots([blocks], self.device)[0][:n],
                                 seqs=spans, k_cache=self.kv.k, v_cache=self.kv.v,
                                 paged=self._paged([blocks], spans))
            hidden = self.model(torch.tensor(token_ids, dtype=torch.long, device=self.device), ctx)
            return self.model.compute_logits(hidden)
        finally:
            self.kv.free(blocks)

    def _paged(self, tables: list[list[int]], spans: list[SeqSpan]) -> PagedMeta | None:
        """The Triton kernels' view of the step (None on the torch path): block tables, query starts, lengths."""
        if not self.triton:
            return None
        bt = block_table_tensor(tables)
        cu = [0]
        for s in spans:
            cu.append(cu[-1] + s.q_len)
        lens = [s.ctx_len for s in spans]
        # split the keys of decode rows over long contexts, where (sequences x kv heads) programs are too few
        decode = len(cu) - 1 == cu[-1]
        segments = split_segments(len(spans), self.kv.k[0].shape[0], max(lens)) if decode else 1
        return PagedMeta(bt.to(self.device), torch.tensor(cu, dtype=torch.int32, device=self.device),
                         torch.tensor(lens, dtype=torch.int32, device=self.device), self.kv.block_size, segments,
                         max(s.q_len for s in spans))


def block_table_tensor(tables: list[list[int]]) -> torch.Tensor:
    """Block tables [S, longest] int32, zero-padded, in one host call (the runner builds one every step)."""
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)


def split_segments(num_seqs: int, kv_heads: int, max_ctx: int, programs: int = 256) -> int:
    """Segments per decode row (a power of two, <= 16): enough programs to fill a GPU, keys per segment >= 256."""
    seg = 1
    while seg < 16 and num_seqs * kv_heads * seg < programs and max_ctx >= 512 * seg:
        seg *= 2
    return seg


def resolve_attention(name: str, device: torch.device) -> str:
    """"auto": the Triton kernels on a CUDA GPU when triton is installed, else torch; "triton" on a CPU only
    under Triton's interpreter (tests)."""
    from ember.errors import ParameterError
    from ember.kernels import triton as ember_triton

    if name not in ("auto", "torch", "triton"):
        raise ParameterError(f"attention={name!r} is invalid: use 'auto', 'torch' or 'triton'")
    if name == "auto":
        return "triton" if device.type == "cuda" and ember_triton.available() else "torch"
    if name == "triton":
        if not ember_triton.available():
            raise ParameterError("attention='triton' needs the triton package: pip install triton")
        if device.type != "cuda" and not ember_triton.interpreting():
            raise ParameterError(f"attention='triton' runs on a CUDA GPU, not {device.type} (on a CPU only under "
                                 "TRITON_INTERPRET=1, for tests); use attention='auto'")
    return name
