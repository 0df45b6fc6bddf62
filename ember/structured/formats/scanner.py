"""Incremental JSON scanning for tool calls: validates text one character at a time, so a streamed call's
name and arguments can be reported while they are generated, and malformed JSON is caught at the first bad
character (the text before it is always a valid JSON prefix).
"""

from __future__ import annotations

import json
import re
from typing import Protocol

_WS = " \t\n\r"
_DIGITS = "0123456789"
_NUM_CHARS = "0123456789+-.eE"
_NUM_PREFIX = re.compile(r"-?(?:(?:0|[1-9][0-9]*)(?:\.(?:[0-9]+(?:[eE][+-]?[0-9]*)?)?|[eE][+-]?[0-9]*)?)?")
_NUM = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_PLAIN = re.compile(r'[^"\\\x00-\x1f]+')  # string characters that need no escape handling
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}

# Where the scanner is between tokens.
_VALUE, _VALUE_OR_CLOSE, _KEY_OR_CLOSE, _KEY, _COLON, _AFTER, _DONE = range(7)
# Inside a token.
_STRING, _NUMBER, _LITERAL = range(7, 10)


class JsonScanner:
    """A JSON validator fed one growing text. Subclasses hear where values start and end (`depth` 0 is the
    top-level value) and which key labels the next value; a hook returning False makes that character an
    error."""

    def __init__(self) -> None:
        self.stack: list[str] = []  # open containers, "{" or "["
        self.state = _VALUE
        self.error: int | None = None  # position of the first invalid character
        self._resume = _VALUE  # the state after the current token
        self._tok = 0  # where the current token (string, number, literal) started
        self._lit = ""  # the rest of a literal still expected
        self._esc = 0  # in a string: 0, 1 after a backslash, 2-5 inside \\uXXXX
        self._hex = ""
        self._is_key = False
        self.str_safe = 0  # in a string: end of the text that decodes to whole characters
        self.text = ""

    @property
    def done(self) -> bool:
        return self.state == _DONE

    def on_start(self, depth: int, pos: int, ch: str) -> bool:
        return True

    def on_end(self, depth: int, end: int) -> bool:
        return True

    def on_key(self, depth: int, key: str) -> bool:
        return True

    def feed(self, text: str, pos: int) -> int:
        """Scan text[pos:]; returns where it stopped: the end of text, of the value, or the error."""
        self.text, n = text, len(text)
        while pos < n and self.error is None and self.state != _DONE:
            st, ch = self.state, text[pos]
            if st == _STRING:
                pos = self._string(text, pos)
                continue
            if st == _NUMBER:
                if ch in _NUM_CHARS:
                    if not _NUM_PREFIX.fullmatch(text, self._tok, pos + 1):
                        self.error = pos
                    pos += 1
                elif not _NUM.fullmatch(text, self._tok, pos):
                    self.error = pos
                else:
                    self._ended(pos, pos)  # the delimiter is scanned again in the next state
                continue
            if st == _LITERAL:
                if ch != self._lit[0]:
                    self.error = pos
                else:
                    self._lit = self._lit[1:]
                    if not self._lit:
                        self._ended(pos + 1, pos)
                pos += 1
                continue
            if ch in _WS:
                pos += 1
                continue
            top = self.stack[-1] if self.stack else ""
            if st in (_VALUE, _VALUE_OR_CLOSE) and not (st == _VALUE_OR_CLOSE and ch == "]"):
                self._value(ch, pos)
            elif st in (_KEY_OR_CLOSE, _KEY) and ch == '"':
                self.state, self._tok, self._is_key, self._esc = _STRING, pos, True, 0
            elif st == _COLON and ch == ":":
                self.state = _VALUE
            elif st == _AFTER and ch == ",":
                self.state = _KEY if top == "{" else _VALUE
            elif (ch == "}" and top == "{" and st in (_KEY_OR_CLOSE, _AFTER)) or (
                ch == "]" and top == "[" and st in (_VALUE_OR_CLOSE, _AFTER)
            ):
                self.stack.pop()
                self._ended(pos + 1, pos)
            else:
                self.error = pos
            pos += 1
        return pos

    def _value(self, ch: str, pos: int) -> None:
        valid = ch in '{["-' or ch in _DIGITS or ch in _LITERALS
        if not valid or not self.on_start(len(self.stack), pos, ch):
            self.error = pos
        elif ch in "{[":
            self.stack.append(ch)
            self.state = _KEY_OR_CLOSE if ch == "{" else _VALUE_OR_CLOSE
        elif ch == '"':
            self.state, self._tok, self._is_key, self._esc, self.str_safe = _STRING, pos, False, 0, pos + 1
        elif ch in _LITERALS:
            self.state, self._lit = _LITERAL, _LITERALS[ch]
        else:
            self.state, self._tok = _NUMBER, pos

    def _string(self, text: str, pos: int) -> int:
        ch = text[pos]
        if self._esc == 1:
            if ch == "u":
                self._esc, self._hex = 2, ""
            elif ch in '"\\/bfnrt':
                self._esc, self.str_safe = 0, pos + 1
            else:
                self.error = pos
        elif self._esc >= 2:
            if ch not in "0123456789abcdefABCDEF":
                self.error = pos
            else:
                self._hex += ch
                if len(self._hex) == 4:
                    self._esc = 0
                    if not 0xD800 <= int(self._hex, 16) <= 0xDBFF:  # a high surrogate waits for its pair
                        self.str_safe = pos + 1
        elif ch == "\\":
            self._esc = 1
        elif ch == '"':
            if self._is_key:
                key = json.loads(text[self._tok : pos + 1])
                self.state = _COLON
                if not self.on_key(len(self.stack), key):
                    self.error = pos
            else:
                self._ended(pos + 1, pos)
        elif ch < " ":
            self.error = pos
        else:
            m = _PLAIN.match(text, pos)
            self.str_safe = m.end() if m else pos + 1
            return self.str_safe
        return pos + 1

    def _ended(self, end: int, pos: int) -> None:
        self.state = _AFTER if self.stack else _DONE
        if not self.on_end(len(self.stack), end):
            self.error = pos


def decode_piece(raw: str) -> str:
    """The text of a piece of a JSON string's inside (whole escapes only); lone surrogates become U+FFFD."""
    return _LONE_SURROGATE.sub("\ufffd", json.loads(f'"{raw}"'))


class CallSink(Protocol):
    def call_named(self, name: str) -> None: ...
    def call_done(self, arguments: str | None, end: int) -> None: ...


class CallScanner(JsonScanner):
    """Finds call objects ({"name": ..., "arguments" | "parameters": {...}}, other keys ignored) at depth
    `call_depth`; in `envelope` mode the value is {"content": "..."} or {"tool_calls": [calls]}."""

    def __init__(self, sink: CallSink, call_depth: int = 0, envelope: bool = False) -> None:
        super().__init__()
        self.sink, self.call_depth, self.envelope = sink, call_depth, envelope
        self.top_key: str | None = None  # envelope: the key whose value is being scanned
        self.envelope_keys = 0
        self.content_start: int | None = None  # envelope: where the content string's inside starts
        self.content_end: int | None = None
        self.in_call = False
        self.name: str | None = None
        self.args_start: int | None = None
        self.args_end: int | None = None
        self.args_string = False
        self._key: str | None = None
        self._name_start: int | None = None

    def _calls_here(self, depth: int) -> bool:
        return depth == self.call_depth and (not self.envelope or self.top_key == "tool_calls")

    def on_key(self, depth: int, key: str) -> bool:
        if self.envelope and depth == 1:
            self.top_key = key
            self.envelope_keys += key in ("content", "tool_calls")
        elif self.in_call and depth == self.call_depth + 1:
            self._key = key
        return True

    def on_start(self, depth: int, pos: int, ch: str) -> bool:
        if self.envelope and depth < 2:
            want = "{" if depth == 0 else {"content": '"', "tool_calls": "["}.get(self.top_key or "", ch)
            if depth == 1 and self.top_key == "content":
                self.content_start = pos + 1
            return ch == want
        if depth < self.call_depth:
            return ch == "["
        if self._calls_here(depth):
            if ch != "{":
                return False
            self.in_call, self.name, self.args_start, self.args_end, self._key = True, None, None, None, None
            self._name_start = None
        elif self.in_call and depth == self.call_depth + 1:
            if self._key == "name" and self._name_start is None and self.name is None:
                self._name_start = pos
                return ch == '"'
            if self._key in ("arguments", "parameters") and self.args_start is None:
                self.args_start, self.args_string = pos, ch == '"'
                return ch in '{"'
        return True

    def on_end(self, depth: int, end: int) -> bool:
        text = self.text
        if self.envelope and depth == 1 and self.top_key == "content" and self.content_start is not None:
            self.content_end = end - 1
        elif self.envelope and depth == 0:
            return self.envelope_keys > 0
        elif self.in_call and depth == self.call_depth + 1:
            if self._name_start is not None and self.name is None:
                self.name = json.loads(text[self._name_start : end])
                self.sink.call_named(self.name)
            elif self.args_start is not None and self.args_end is None:
                self.args_end = end
        elif self.in_call and self._calls_here(depth):
            if self.name is None:
                return False
            args: str | None = None
            if self.args_string and self.args_end is not None:  # arguments given as a JSON string
                args = json.loads(text[self.args_start : self.args_end])
                if not _is_object_text(args):
                    return False
            elif self.args_end is None:
                args = "{}"
            self.in_call = False
            self.sink.call_done(args, end)
        return True


def _is_object_text(s: str) -> bool:
    try:
        return isinstance(json.loads(s), dict)
    except ValueError:
        return False
