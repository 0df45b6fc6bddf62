"""A tool-call format: how tools reach the chat template, the grammar that constrains calls, and a parser
that turns the reply's text (whole or streamed) back into content and OpenAI-shaped tool calls."""

from __future__ import annotations

from typing import Any, ClassVar

from ember.structured.formats.scanner import CallScanner, decode_piece
from ember.structured.tools import ChatDelta, Tool, ToolCall, ToolCallDelta, new_call_id
from ember.tokenizer import Tokenizer

# End-of-turn texts that may close the decoded reply (special tokens are kept in tool replies).
END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "</s>", "<|endoftext|>", "<|end_of_text|>",
               "<end_of_turn>", "<|end|>", "<eos>")  # fmt: skip
_WS = " \t\n\r"
_CONTENT, _PRE, _JSON, _TAIL = range(4)


class ToolParser:
    """One per reply: feed() the decoded text as it streams, close() at the end.

    Text is content until a trigger (or, with `start_brace`, a `{` opening the reply) starts a call region:
    JSON call objects, with `close_tag` after each (hermes), `separator` between them (llama3), or in an
    array (`arrays`, mistral); `envelope` reads the generic {"content"} / {"tool_calls"} reply instead.
    Decisions depend only on the text so far, so any split of the text gives the same result.
    """

    def __init__(self, tools: list[Tool], *, triggers: tuple[str, ...] = (), start_brace: bool = False,
                 arrays: bool = False, close_tag: str | None = None, separator: str | None = None,
                 envelope: bool = False) -> None:
        self.tools = tools
        self.calls: list[ToolCall] = []  # calls completed so far
        self.incomplete = False  # a call was cut off (by the end of output, or by malformed JSON in it)
        self._triggers, self._start_brace, self._arrays = triggers, start_brace, arrays
        self._close_tag, self._separator, self._envelope = close_tag, separator, envelope
        self._markers = triggers + END_MARKERS
        self._text, self._pos, self._mode = "", 0, _CONTENT
        self._at_start = start_brace  # no text but whitespace yet
        self._pending_ws = ""  # whitespace held until content follows: around calls it is layout
        self._said = False  # content sent
        self._fallback: int | None = None  # start of region text not reported yet (content if it fails)
        self._scanner: CallScanner | None = None
        self._open: tuple[int, str, str] | None = None  # the named call being generated: index, id, name
        self._args_sent = self._content_sent = 0
        self._count = 0
        self._out = ChatDelta()

    # ---- public -------------------------------------------------------------------------------------
    def feed(self, text: str) -> ChatDelta:
        self._out = ChatDelta()
        self._text += text
        self._run()
        return self._out

    def close(self) -> ChatDelta:
        self._out = ChatDelta()
        self._run()
        if self._mode == _CONTENT:
            rest = self._text[self._pos :]
            while marker := next((m for m in END_MARKERS if rest.endswith(m)), ""):
                rest = rest[: -len(marker)]
            self._emit(rest)
        elif self._mode == _PRE or (self._mode == _JSON and self._scanner is not None and (
                self._scanner.in_call or (self._scanner.content_start is None and not self.calls))):
            self.incomplete = True  # a call was being written; its unreported text is dropped
        self._pos = len(self._text)
        if not self._count:
            self._out.content += self._pending_ws
        self._pending_ws = ""
        return self._out

    # ---- the machine --------------------------------------------------------------------------------
    def _run(self) -> None:
        step = {_CONTENT: self._content, _PRE: self._pre, _JSON: self._json, _TAIL: self._tail}
        while step[self._mode]():
            pass

    def _content(self) -> bool:
        if self._pos:  # no region is open: what was read is not needed again
            self._text, self._pos = self._text[self._pos :], 0
        text, pos = self._text, 0
        if not text:
            return False
        if self._at_start:
            j = _skip_ws(text, pos)
            if j == len(text):
                return False
            self._at_start = False
            if text[j] == "{":
                self._enter(pos, j)
                return True
        hits = [(k, t) for t in self._triggers if (k := text.find(t, pos)) >= 0]
        if hits:
            k, t = min(hits)
            self._emit(text[pos:k])
            self._enter(k, k + len(t))
            return True
        end = len(text) - _held(text, pos, self._markers)
        self._emit(text[pos:end])
        self._pos = end
        return False

    def _enter(self, start: int, pos: int) -> None:
        self._mode, self._fallback, self._pos = _PRE, start, pos

    def _pre(self) -> bool:
        j = self._pos = _skip_ws(self._text, self._pos)
        if j == len(self._text):
            return False
        ch = self._text[j]
        if ch == "{" or (ch == "[" and self._arrays):
            depth = 2 if self._envelope else int(ch == "[")
            self._scanner = CallScanner(self, call_depth=depth, envelope=self._envelope)
            self._mode = _JSON
        else:
            self._fail(j)
        return True

    def _json(self) -> bool:
        sc = self._scanner
        assert sc is not None
        self._pos = sc.feed(self._text, self._pos)
        self._stream(sc)
        if sc.error is not None:
            self._fail(sc.error)
        elif sc.done:
            self._mode = _TAIL
        else:
            return False
        return True

    def _tail(self) -> bool:
        text = self._text
        j = _skip_ws(text, self._pos)
        tag, sep = self._close_tag, self._separator
        if j == len(text) and (tag or sep):
            return False
        if tag:
            got = text[j : j + len(tag)]
            if got == tag:
                self._pos = j + len(tag)
            elif tag.startswith(got) and j + len(got) == len(text):
                return False  # part of the closing tag
            else:
                self._fail(j)
                return True
        elif sep and text.startswith(sep, j):
            self._pos, self._mode = j + len(sep), _PRE
            return True
        self._mode, self._scanner, self._fallback = _CONTENT, None, None
        return True

    def _fail(self, pos: int) -> None:
        """Malformed text in a call region: what was not reported yet becomes content, and the text from
        the bad character on is read as content again (it may start another call)."""
        if self._open is not None:  # its name and arguments so far are out already
            self.incomplete, self._open = True, None
        elif self._fallback is not None:
            self._emit(self._text[self._fallback : pos])
        self._mode, self._pos, self._scanner, self._fallback = _CONTENT, pos, None, None

    # ---- output -------------------------------------------------------------------------------------
    def _emit(self, s: str) -> None:
        if self._count and not self._said:  # text after calls starts at its first word
            s, self._pending_ws = (self._pending_ws + s).lstrip(_WS), ""
        core = s.rstrip(_WS)
        if core:
            self._out.content += self._pending_ws + core
            self._pending_ws, self._said = s[len(core) :], True
        else:
            self._pending_ws += s

    def _stream(self, sc: CallScanner) -> None:
        """Send what the scanner has validated: the open call's arguments, the envelope's content."""
        text = self._text
        limit = sc.error if sc.error is not None else self._pos
        if self._open is not None and sc.args_start is not None and not sc.args_string:
            end = sc.args_end
            if end is None:  # an end marker may be coming: the output stops there
                end = limit - _held(text, sc.args_start, END_MARKERS, limit)
            start = max(self._args_sent, sc.args_start)
            if end > start:
                self._args(text[start:end])
                self._args_sent = end
        if sc.content_start is not None:
            end = sc.content_end if sc.content_end is not None else min(sc.str_safe, limit)
            start = max(self._content_sent, sc.content_start)
            if end > start:
                self._out.content += decode_piece(text[start:end])
                self._content_sent, self._fallback, self._said = end, None, True

    def _args(self, s: str) -> None:
        assert self._open is not None
        last = self._out.tool_calls[-1] if self._out.tool_calls else None
        if last is not None and last.index == self._open[0]:
            last.arguments += s
        else:
            self._out.tool_calls.append(ToolCallDelta(self._open[0], arguments=s))

    # CallSink: called by the scanner
    def call_named(self, name: str) -> None:
        self._open = (self._count, new_call_id(), name)
        self._count += 1
        self._fallback, self._args_sent = None, 0
        self._out.tool_calls.append(ToolCallDelta(self._open[0], self._open[1], name))

    def call_done(self, arguments: str | None, end: int) -> None:
        sc, opened = self._scanner, self._open
        assert sc is not None and opened is not None
        if arguments is None:  # the raw arguments object: send what is left of it
            self._stream(sc)
            arguments = self._text[sc.args_start : sc.args_end]
        else:
            self._args(arguments)
        self.calls.append(ToolCall(opened[1], opened[2], arguments))
        self._open, self._fallback = None, end


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def _held(text: str, pos: int, markers: tuple[str, ...], end: int | None = None) -> int:
    """Length of the tail of text[pos:end] that may be the start of a marker (or whole end markers)."""
    s = text[pos:end]
    n = 0
    for m in markers:
        for k in range(min(len(m), len(s)), n, -1):
            if s.endswith(m[:k]):
                n = k
                break
    grown = True
    while grown:  # whole end markers before it may also close the reply
        grown = False
        for m in END_MARKERS:
            if s[: len(s) - n].endswith(m):
                n, grown = n + len(m), True
    return n


class ToolFormat:
    """A family's way of calling tools. Instances carry no state; one serves every request."""

    name: ClassVar[str] = ""

    @classmethod
    def detect(cls, template: str | None) -> bool:
        return False

    def prepare(self, messages: list[dict[str, Any]], tools: list[Tool], choice: str
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Messages for the chat template, plus extra template kwargs."""
        raise NotImplementedError

    def grammar(self, tools: list[Tool], choice: str, parallel: bool, tokenizer: Tokenizer) -> str | None:
        """An llguidance grammar for the reply; None when choice is "none"."""
        raise NotImplementedError

    def parser(self, tools: list[Tool]) -> ToolParser:
        raise NotImplementedError

    def parse(self, text: str, tools: list[Tool]) -> tuple[str, list[ToolCall]]:
        """A whole reply: (content, complete calls)."""
        p = self.parser(tools)
        content = p.feed(text).content + p.close().content
        return content, p.calls
