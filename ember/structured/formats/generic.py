"""Tools for templates that have no tool support (SmolLM2's ChatML, Gemma 3, ...): the system message
describes them, and the whole reply is one JSON object, {"tool_calls": [...]} or {"content": "..."},
enforced by a JSON schema. Past calls and tool results are rewritten into turns any template renders."""

from __future__ import annotations

import json
from typing import Any

import llguidance

from ember.structured.formats.base import ToolFormat, ToolParser
from ember.structured.formats.native import call_schema, chosen, history_call
from ember.structured.spec import JSON_STYLE
from ember.structured.tools import Tool
from ember.tokenizer import Tokenizer

_CALLS = '{"tool_calls": [{"name": "<tool name>", "arguments": {<arguments, following its schema>}}]}'
_TEXT = '{"content": "<your answer>"}'


class GenericFormat(ToolFormat):
    name = "generic"

    @classmethod
    def detect(cls, template: str | None) -> bool:
        return True  # any template renders plain system / user / assistant turns

    def prepare(self, messages: list[dict[str, Any]], tools: list[Tool], choice: str
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        out = rewrite_history(messages)
        if tools and choice != "none":
            intro = system_text(tools, choice)
            if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
                out[0] = {**out[0], "content": f"{intro}\n\n{out[0]['content']}"}
            else:
                out.insert(0, {"role": "system", "content": intro})
        return out, {}

    def parser(self, tools: list[Tool]) -> ToolParser:
        return ToolParser(tools, start_brace=True, envelope=True)

    def grammar(self, tools: list[Tool], choice: str, parallel: bool, tokenizer: Tokenizer) -> str | None:
        if choice == "none" or not tools:
            return None
        one, defs = call_schema(chosen(tools, choice))
        # At most one call per tool offered: a model without tool training otherwise tends to repeat its
        # last call until max_tokens (SmolLM2-135M did, every time).
        calls: dict[str, Any] = {"type": "array", "items": one, "minItems": 1, "maxItems": len(tools)}
        if not parallel or choice not in ("auto", "required"):
            calls["maxItems"] = 1
        schema: dict[str, Any] = _envelope("tool_calls", calls)
        if choice == "auto":
            schema = {"anyOf": [schema, _envelope("content", {"type": "string"})]}
        if defs:
            schema["$defs"] = defs
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)  # type: ignore[arg-type]


def _envelope(key: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {key: value}, "required": [key], "additionalProperties": False}


def system_text(tools: list[Tool], choice: str) -> str:
    lines = ["You can call these tools (functions); each is given with the JSON schema of its arguments:", ""]
    lines += [json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters},
                         ensure_ascii=False) for t in tools]
    lines += ["", "Reply with exactly one JSON object and nothing else."]
    if choice == "auto":
        lines += [f"To call one or more tools: {_CALLS}", f"To answer in text: {_TEXT}",
                  "Call a tool only when you need its result; otherwise answer in text."]
    elif choice == "required":
        lines += [f"Call one or more tools: {_CALLS}"]
    else:
        lines += [f'Call the tool {choice}: {{"tool_calls": [{{"name": "{choice}", "arguments": {{...}}}}]}}']
    lines += ['Tool results come back in a user message that starts with "Tool result".']
    return "\n".join(lines)


def rewrite_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Past calls become the assistant's JSON replies; tool results become user turns (consecutive ones
    merged, and merged with a user message that follows, so roles still alternate)."""
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # call id -> function name
    results: set[int] = set()  # indices in `out` of user turns made of tool results
    for m in messages:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for c in map(history_call, m["tool_calls"]):
                fn = c.get("function") or {}
                names[str(c.get("id"))] = str(fn.get("name"))
                calls.append({"name": fn.get("name"), "arguments": fn.get("arguments", {})})
            reply = json.dumps({"tool_calls": calls}, ensure_ascii=False)
            out.append({"role": "assistant", "content": reply})
        elif role == "tool":
            call_id = m.get("tool_call_id")
            label = ", ".join(str(x) for x in (m.get("name") or names.get(str(call_id)), call_id) if x)
            text = f"Tool result{f' ({label})' if label else ''}: {_text(m.get('content'))}"
            if len(out) - 1 in results:
                out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n\n{text}"}
            else:
                results.add(len(out))
                out.append({"role": "user", "content": text})
        elif role == "user" and len(out) - 1 in results and isinstance(m.get("content"), str):
            out[-1] = {**m, "content": f"{out[-1]['content']}\n\n{m['content']}"}
        else:
            out.append(m)
    return out


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return json.dumps(content, ensure_ascii=False)
