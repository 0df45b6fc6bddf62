"""Mistral (v0.3, Nemo) calls: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, where [TOOL_CALLS] is
a control token."""

from __future__ import annotations

import hashlib
import re
import string
from typing import Any

from ember.structured.formats.base import ToolParser
from ember.structured.formats.native import (
    TEXT,
    NativeFormat,
    call_schema,
    chosen,
    compile_lark,
    json_rule,
    lazy_trigger,
    literal,
)
from ember.structured.tools import Tool
from ember.tokenizer import Tokenizer

TRIGGER = "[TOOL_CALLS]"
_ID = re.compile(r"[a-zA-Z0-9]{9}")
_ALNUM = string.ascii_letters + string.digits


class MistralFormat(NativeFormat):
    name = "mistral"

    @classmethod
    def detect(cls, template: str | None) -> bool:
        return bool(template) and TRIGGER in template  # type: ignore[operator]

    def prepare(self, messages: list[dict[str, Any]], tools: list[Tool], choice: str
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        msgs, kwargs = super().prepare(messages, tools, choice)
        # Mistral's templates reject call ids that are not 9 alphanumerics: map each id to one that is.
        out = []
        for m in msgs:
            if m.get("tool_calls"):
                m = {**m, "tool_calls": [{**c, "id": short_id(c["id"])} if isinstance(c.get("id"), str) else c
                                         for c in m["tool_calls"]]}
            if isinstance(m.get("tool_call_id"), str):
                m = {**m, "tool_call_id": short_id(m["tool_call_id"])}
            out.append(m)
        return out, kwargs

    def parser(self, tools: list[Tool]) -> ToolParser:
        return ToolParser(tools, triggers=(TRIGGER,), arrays=True)

    def grammar(self, tools: list[Tool], choice: str, parallel: bool, tokenizer: Tokenizer) -> str | None:
        if choice == "none" or not tools:
            return None
        one, defs = call_schema(chosen(tools, choice))
        array: dict[str, Any] = {"type": "array", "items": one, "minItems": 1}
        if not parallel or choice not in ("auto", "required"):
            array["maxItems"] = 1
        # SentencePiece models often write " [" after the control token.
        lines = [f"arr: {json_rule(array, defs)}", 'body: " "? arr']
        if choice == "auto":
            lines += [*lazy_trigger(tokenizer, TRIGGER), TEXT, "start: TEXT | trig body"]
        else:
            lines += [f"start: {literal(tokenizer, TRIGGER)} body"]
        return compile_lark(lines)


def short_id(call_id: str) -> str:
    """The same 9 alphanumerics for the same id (an id that already is one stays)."""
    if _ID.fullmatch(call_id):
        return call_id
    n = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    return "".join(_ALNUM[(n // 62**i) % 62] for i in range(9))
