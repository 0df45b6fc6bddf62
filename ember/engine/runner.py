"""ModelRunner: turns a scheduled batch into flat tensors, runs the model, returns next-token logits."""

from __future__ import annotations

import torch
from torch import nn

from ember.engine.kv_cache import KVCache
from ember.engine.scheduler import SchedulerOutput
from ember.layers.attention import ForwardContext, SeqSpan
from ember.structured.backend import RowMasks


class ModelRunner:
    def __init__(self, model: nn.Module, kv: KVCache, device: torch.device) -> None:
        self.model, self.kv, self.device = model, kv, device

    @torch.inference_mode()
    def run(self, batch: SchedulerOutput, masks: RowMasks | None = None) -> torch.Tensor | None:
        """Logits [B, V] (fp32) for the scheduled sequences that sample this step, in batch order. masks: the
        structured-output rows' allowed tokens, so the head's exact candidates are allowed ones."""
        if not batch.seqs:
            return None
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
        )
        hidden = self.model(torch.tensor(ids, dtype=torch.long, device=self.device), ctx)  # [T, D]
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
            ctx = ForwardContext(positions=torch.arange(n, device=self.device),
                                 slot_mapping=self.kv.table_slots([blocks], self.device)[0][:n],
                                 seqs=[SeqSpan(0, n, n, None)], k_cache=self.kv.k, v_cache=self.kv.v)
            hidden = self.model(torch.tensor(token_ids, dtype=torch.long, device=self.device), ctx)
            return self.model.compute_logits(hidden)
        finally:
            self.kv.free(blocks)
