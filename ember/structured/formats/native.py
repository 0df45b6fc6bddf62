"""What the native formats (hermes, llama3, mistral) share: tools reach the chat template as `tools=` (HF's
convention), and grammar pieces for calls written in the family's own syntax."""

from __future__ import annotations

import json
from typing import Any

import llguidance

from ember.structured.formats.base import ToolFormat
from ember.structured.spec import JSON_STYLE, closed
from ember.structured.tools import Tool, ToolCall
from ember.tokenizer import Tokenizer

TEXT = r"TEXT: /(.|\n)*/"


class NativeFormat(ToolFormat):
    def prepare(self, messages: list[dict[str, Any]], tools: list[Tool], choice: str
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        out = [history_message(m) for m in messages]
        return out, ({"tools": [t.openai() for t in tools]} if tools and choice != "none" else {})


def history_message(m: dict[str, Any]) -> dict[str, Any]:
    """A past message as templates expect it: tool call arguments as objects (templates `tojson` them)."""
    if not m.get("tool_calls"):
        return m
    return {**m, "tool_calls": [history_call(c) for c in m["tool_calls"]]}


def history_call(call: Any) -> dict[str, Any]:
    c = call.openai() if isinstance(call, ToolCall) else dict(call)
    fn = c.get("function")
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
        try:
            args = json.loads(fn["arguments"])
        except ValueError:
            args = None
        if isinstance(args, dict):
            c["function"] = {**fn, "arguments": args}
    return c


def chosen(tools: list[Tool], choice: str) -> list[Tool]:
    """The tools a reply may call: all of them, or the one tool_choice names."""
    return tools if choice in ("auto", "required") else [t for t in tools if t.name == choice]


def call_schema(tools: list[Tool], args_key: str = "arguments") -> tuple[dict[str, Any], dict[str, Any]]:
    """JSON schema of one call {"name": <const>, args_key: <that tool's parameters, closed>} over `tools`, and
    the $defs the root must carry (schemas with $ref are moved there, their refs rebased)."""
    defs: dict[str, Any] = {}
    variants = []
    for i, t in enumerate(tools):
        args: dict[str, Any] = closed(t.parameters)  # no keys beyond the declared ones
        if _has_ref(args):
            defs[f"tool{i}"] = _rebase(args, f"#/$defs/tool{i}")
            args = {"$ref": f"#/$defs/tool{i}"}
        variants.append({"type": "object", "properties": {"name": {"const": t.name}, args_key: args},
                         "required": ["name", args_key], "additionalProperties": False})
    return (variants[0] if len(variants) == 1 else {"anyOf": variants}), defs


def json_rule(schema: dict[str, Any], defs: dict[str, Any]) -> str:
    """An inline %json in ember's compact JSON style."""
    return "%json " + json.dumps({"x-guidance": JSON_STYLE, **schema, **({"$defs": defs} if defs else {})},
                                 ensure_ascii=False)


def literal(tokenizer: Tokenizer, text: str) -> str:
    """The text as its own token (which llguidance may see as special) or spelled out in bytes."""
    i = tokenizer.backend.token_to_id(text)
    return f"(<[{i}]> | {json.dumps(text)})" if i is not None else json.dumps(text)


def lazy_trigger(tokenizer: Tokenizer, text: str, rule: str = "trig", before: str = "TEXT") -> list[str]:
    """`rule`: free text (`before`) up to the first occurrence of the trigger; the grammar of what follows
    switches on there."""
    i = tokenizer.backend.token_to_id(text)
    alts = ([f"{before} <[{i}]>"] if i is not None else []) + [f"{rule}_lit"]
    return [f"{rule}: {' | '.join(alts)}", f"{rule}_lit[lazy]: {before} {json.dumps(text)}"]


def compile_lark(lines: list[str]) -> str:
    return llguidance.LLMatcher.grammar_from_lark("\n".join(lines) + "\n")


def _has_ref(x: Any) -> bool:
    if isinstance(x, dict):
        return "$ref" in x or any(_has_ref(v) for v in x.values())
    return isinstance(x, list) and any(_has_ref(v) for v in x)


def _rebase(x: Any, base: str) -> Any:
    """A copy with local refs ("#", "#/...") pointing under `base`."""
    if isinstance(x, list):
        return [_rebase(v, base) for v in x]
    if not isinstance(x, dict):
        return x
    out = {k: _rebase(v, base) for k, v in x.items()}
    ref = x.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        out["$ref"] = base + ref[1:]
    return out
