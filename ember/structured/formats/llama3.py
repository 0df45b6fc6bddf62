"""Llama 3.1 / 3.2 / 3.3 JSON tool calling: the reply is `{"name": ..., "parameters": {...}}` (several
joined by "; "), optionally after `<|python_tag|>`. A text reply must not start with `{`, so a reply that
does is a call."""

from __future__ import annotations

from typing import Any

from ember.structured.formats.base import ToolParser
from ember.structured.formats.native import (
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

PYTHON_TAG = "<|python_tag|>"


class Llama3Format(NativeFormat):
    name = "llama3"

    @classmethod
    def detect(cls, template: str | None) -> bool:
        t = template or ""
        return PYTHON_TAG in t or ("<|eot_id|>" in t and "parameters" in t and "tools" in t)

    def prepare(self, messages: list[dict[str, Any]], tools: list[Tool], choice: str
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        msgs, kwargs = super().prepare(messages, tools, choice)
        # Llama's template renders one call per assistant message: split parallel calls.
        out: list[dict[str, Any]] = []
        for m in msgs:
            calls = m.get("tool_calls") or []
            if m.get("role") == "assistant" and len(calls) > 1:
                out += [{**m, "content": m.get("content") if i == 0 else None, "tool_calls": [c]}
                        for i, c in enumerate(calls)]
            else:
                out.append(m)
        return out, kwargs

    def parser(self, tools: list[Tool]) -> ToolParser:
        return ToolParser(tools, triggers=(PYTHON_TAG,), start_brace=True, separator=";")

    def grammar(self, tools: list[Tool], choice: str, parallel: bool, tokenizer: Tokenizer) -> str | None:
        if choice == "none" or not tools:
            return None
        lines = [f"fn: {json_rule(*call_schema(chosen(tools, choice), 'parameters'))}",
                 'calls: fn ("; " fn)*' if parallel and choice in ("auto", "required") else "calls: fn"]
        if choice == "auto":
            # The parser reads a reply whose first non-blank character is `{` as calls, so the grammar does
            # too: text may not start that way, and calls may follow a few leading blanks.
            lines += [*lazy_trigger(tokenizer, PYTHON_TAG), r"TEXT: /[ \t\r\n]*([^{ \t\r\n](.|\n)*)?/",
                      r"BLANK: /[ \t\r\n]{1,4}/", "start: TEXT | BLANK? calls | trig calls"]
        else:
            lines += [f"start: calls | {literal(tokenizer, PYTHON_TAG)} calls"]
        return compile_lark(lines)
