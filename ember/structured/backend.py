"""The grammar backend: the model's vocabulary for llguidance, matchers per request, token masks per step.

A matcher is compiled before its request is queued, in the caller's thread (the server: a worker thread),
so a slow schema never stalls the engine loop. Each step, the rows that sample under a constraint get one
bit per token (allowed or not), filled while an accelerator runs the forward pass (inline after it on a CPU);
the sampler applies it to those rows only.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import torch

from ember.errors import ParameterError
from ember.structured.spec import StructuredOutputs
from ember.tokenizer import Tokenizer


class Constraint:
    """One request's matcher: it follows the tokens sampled so far and says what may come next."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_ids: frozenset[int]) -> None:
        self.matcher, self.eos_ids = matcher, eos_ids

    def accept(self, token: int) -> bool:
        """Advance past a sampled token; False if the matcher cannot (it is then in an error state)."""
        return self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """Nothing but the end of the output may follow (the grammar is complete)."""
        return self.matcher.is_stopped()

    @property
    def failed(self) -> bool:
        return self.matcher.is_error()

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class GrammarBackend:
    """One per engine. vocab_size: the width of the model's logits (may exceed the tokenizer's vocabulary:
    padded rows are never allowed under a constraint)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, overlap: bool = False) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        # llguidance's vocabulary covers both the logits and the tokenizer (either may be the larger); the
        # mask rows are that wide, and only the logits' width of them is applied
        self.n_vocab = max(vocab_size, tokenizer.vocab_size)
        self.words = (self.n_vocab + 31) // 32  # int32 words per mask row
        self._lltok: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._masker: ThreadPoolExecutor | None = None
        # Fill masks on a worker thread while the forward pass runs. Worth it when an accelerator runs the
        # model; on a CPU the forward pass has every core busy and a third thread only contends with it
        # (SmolLM2 on 2 cores, 16 JSON rows, A/B alternated: overlapped 0.90x the inline speed, 0.98x at
        # 1 row; 5x slower while another process kept a core busy).
        self.overlap = overlap

    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary (built once: ~0.3 s for a 49k vocabulary)."""
        with self._lock:
            if self._lltok is None:
                self._lltok = llguidance.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.n_vocab,
                                                     eos_token=sorted(self.tokenizer.eos_token_ids))
            return self._lltok

    def compile(self, spec: StructuredOutputs) -> Constraint:
        """A fresh matcher for one request. Errors only the vocabulary can reveal (a special token the
        grammar names but this model lacks) raise ParameterError naming the field."""
        tok = self.ll_tokenizer()
        matcher = llguidance.LLMatcher(tok, spec.llg, log_level=0)
        if matcher.is_error():
            raise ParameterError(f"SamplingParams.structured.{spec.kind}: {matcher.get_error().strip()}")
        return Constraint(matcher, frozenset(tok.eos_tokens))

    # ---- masks ---------------------------------------------------------------------------------------
    def fill(self, constraints: list[Constraint]) -> torch.Tensor:
        """Bitmask [R, W] int32 of the tokens each constraint allows next (bit t % 32 of word t // 32)."""
        mask = torch.empty(len(constraints), self.words, dtype=torch.int32)  # [R, W]
        row_bytes = self.words * 4
        for i, c in enumerate(constraints):
            c.matcher.unsafe_compute_mask_ptr(mask[i].data_ptr(), row_bytes)
            if c.failed:  # llguidance hit a limit mid-output: the row may only end (as "abort", by the engine)
                mask[i].zero_()
                for t in c.eos_ids:
                    mask[i, t // 32] |= _bit(t % 32)
        return mask

    def fill_async(self, constraints: list[Constraint]) -> Future[torch.Tensor]:
        """fill() on a worker thread, so the masks are ready when the forward pass ends."""
        if not self.overlap:
            done: Future[torch.Tensor] = Future()
            done.set_result(self.fill(constraints))
            return done
        if self._masker is None:
            self._masker = ThreadPoolExecutor(1, thread_name_prefix="ember-masks")
        return self._masker.submit(self.fill, constraints)

    def masks(self, constraints: list[Constraint | None]) -> RowMasks | None:
        """The masks of one step's sampling rows (None where a row is unconstrained), or None for none."""
        rows = [i for i, c in enumerate(constraints) if c is not None]
        if not rows:
            return None
        return RowMasks(rows, self.fill_async([constraints[i] for i in rows]), self.vocab_size)  # type: ignore[misc]

    def close(self) -> None:
        if self._masker is not None:
            self._masker.shutdown(wait=False)


class RowMasks:
    """Which sampling rows of a step are constrained, and (once filled) the tokens each allows. Both the
    output head (exact candidates among the allowed tokens) and the sampler read it."""

    def __init__(self, rows: list[int], bits: Future[torch.Tensor], vocab_size: int) -> None:
        self.rows, self._bits, self.vocab_size = rows, bits, vocab_size

    def get(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [R] int64, bitmask [R, W] int32) on `device` (ops.mask_rows applies them); waits for the fill."""
        return torch.tensor(self.rows, device=device), self._bits.result().to(device)


_BITS = torch.arange(32, dtype=torch.int32)


def _bit(b: int) -> int:
    """1 << b as an int32 value (bit 31 is the sign bit)."""
    return (1 << b) - (1 << 32 if b == 31 else 0)


def unpack(mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bitmask [R, W] int32 -> allowed [R, V] bool."""
    r = mask.shape[0]
    return ((mask.unsqueeze(-1) >> _BITS.to(mask.device)) & 1).view(r, -1)[:, :vocab_size].bool()


def pack(allowed: torch.Tensor) -> torch.Tensor:
    """allowed [R, V] bool -> bitmask [R, W] int32 (unpack's inverse)."""
    r, v = allowed.shape
    padded = torch.zeros(r, (v + 31) // 32 * 32, dtype=torch.int64)
    padded[:, :v] = allowed.to(torch.int64)
    words = (padded.view(r, -1, 32) << _BITS.to(torch.int64)).sum(-1)  # [R, W] in 0 .. 2**32 - 1
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
