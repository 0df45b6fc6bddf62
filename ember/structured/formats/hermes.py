"""Hermes-style calls (Hermes 2 Pro, Qwen2.5, Qwen3, ...): text, then
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` blocks, one per call, newlines between."""

from __future__ import annotations

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

OPEN, CLOSE = "<tool_call>", "</tool_call>"
THINK, END_THINK = "<think>", "</think>"


class HermesFormat(NativeFormat):
    name = "hermes"

    @classmethod
    def detect(cls, template: str | None) -> bool:
        return bool(template) and OPEN in template  # type: ignore[operator]

    def parser(self, tools: list[Tool]) -> ToolParser:
        return ToolParser(tools, triggers=(OPEN,), close_tag=CLOSE)

    def grammar(self, tools: list[Tool], choice: str, parallel: bool, tokenizer: Tokenizer) -> str | None:
        if choice == "none" or not tools:
            return None
        # Qwen's <tool_call> is an added token; llguidance treats <...> added tokens as special, so the
        # token and its spelled-out text are both allowed.
        lines = [f"fn: {json_rule(*call_schema(chosen(tools, choice)))}",
                 f'body: "\\n" fn "\\n" {literal(tokenizer, CLOSE)}']
        if choice == "auto":
            lines += [*lazy_trigger(tokenizer, OPEN), TEXT, "call: trig body",
                      "start: call* TEXT" if parallel else "start: TEXT | call"]
        else:
            calls = 'call ("\\n" call)*' if parallel and choice == "required" else "call"
            lines.append(f"call: {literal(tokenizer, OPEN)} body")
            if tokenizer.backend.token_to_id(THINK) is None:
                lines.append(f"start: {calls}")
            else:  # Qwen3 may think before it calls
                lines += [f"start: think? {calls}", *lazy_trigger(tokenizer, END_THINK, "think_end"), TEXT,
                          f"think: {literal(tokenizer, THINK)} think_end /[ \\t\\n]*/"]
        return compile_lark(lines)
