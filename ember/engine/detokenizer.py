"""Incremental detokenizer: token ids in, safe text deltas out, with stop strings.

Decoding one token at a time is wrong twice over: a multi-byte character split across tokens comes
out as U+FFFD, and SentencePiece decoders drop the leading space of a '▁word' piece at the start of
a decode. So each step decodes a short window that starts a few tokens back (prefix offset ..
read offset, as in HF TextStreamer / vLLM) and emits only what the newest tokens added.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded in front of the first output token: enough context for its leading space.
_PROMPT_CONTEXT = 5
# A run of tokens that add no text (skipped special tokens) would grow the window without bound;
# past this many tokens it is re-anchored on the last few.
_MAX_WINDOW = 32


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str: ...


class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas whose concatenation is always `.text`.

    `.text` is the text emitted so far (deltas returned by add / finish); after a stop string or
    finish() it is the final text. Text that could still be the start of a stop string, and bytes
    of an unfinished character, are held back until they resolve.
    """

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_token_ids: Sequence[int],
        *,
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = [s for s in stop if s]
        # Only the window is ever decoded, so only the prompt's tail is kept.
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix = 0  # window start: context decoded only to get the next token's text right
        self._read = len(self._ids)  # tokens before this are already turned into text
        self._prefix_text = self._decode(self._ids)
        if self._prefix_text.endswith(_REPLACEMENT):
            # The prompt ends inside a character; slicing after it would be off, so start fresh.
            self._prefix = self._read
            self._prefix_text = ""
        self._pending = ""  # decoded text held back because it may begin a stop string
        self._parts: list[str] = []
        self._stop_reason: str | None = None
        self._done = False

    # ---- public --------------------------------------------------------------------------------
    @property
    def stopped(self) -> bool:
        """A stop string matched: `.text` is final and excludes it."""
        return self._stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    @property
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def add(self, token_id: int) -> str:
        """Take one output token; return the text that is now safe to show (often "")."""
        if self._done:
            return ""
        self._ids.append(token_id)
        window = self._decode(self._ids[self._prefix :])
        if window.endswith(_REPLACEMENT):
            return ""  # most likely a character whose remaining bytes are in the next token(s)
        new = window[len(self._prefix_text) :]
        if new:
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        elif len(self._ids) - self._prefix > _MAX_WINDOW:
            self._prefix, self._read = len(self._ids) - _PROMPT_CONTEXT, len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        if self._prefix > 4 * _MAX_WINDOW:  # forget tokens that no window will decode again
            del self._ids[: self._prefix]
            self._prefix, self._read = 0, self._read - self._prefix
        return self._push(new)

    def finish(self) -> str:
        """Generation ended for another reason (eos, length): flush everything held back."""
        if self._done:
            return ""
        window = self._decode(self._ids[self._prefix :])
        out = self._push(window[len(self._prefix_text) :])  # an invalid tail is emitted as-is here
        self._done = True
        if self._pending:
            out += self._pending
            self._parts.append(self._pending)
            self._pending = ""
        return out

    # ---- internals -----------------------------------------------------------------------------
    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _push(self, new: str) -> str:
        """Add decoded text; emit all of it but a possible stop-string start, or end at a stop string."""
        if not self._stop:
            self._parts.append(new)
            return new
        # Everything already emitted is clear of stop strings, so a match can only begin in _pending.
        pending = self._pending + new
        hit = self._find_stop(pending)
        if hit is not None:
            at, self._stop_reason = hit
            out, self._pending, self._done = pending[:at], "", True
        else:
            keep = self._partial_stop_len(pending)
            out, self._pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self._parts.append(out)
        return out

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        """Earliest stop string in text; at a tie the shorter, which a finer stream would have seen first."""
        best: tuple[int, str] | None = None
        for s in self._stop:
            at = text.find(s)
            if at >= 0 and (best is None or at < best[0] or (at == best[0] and len(s) < len(best[1]))):
                best = (at, s)
        return best

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        longest = max(len(s) for s in self._stop) - 1
        for n in range(min(longest, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0
