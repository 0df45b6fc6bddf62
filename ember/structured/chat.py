"""Tools in a chat request: one plan for every surface (Python chat(), the server).

The plan says how the conversation reaches the chat template (the model's own tool format, or the generic
JSON envelope for templates without one), which grammar constrains the reply, and how the reply's text
turns back into content and tool calls (`ToolOutputs`, applied to the engine's stream of outputs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ember.engine.outputs import RequestOutput
from ember.errors import ParameterError
from ember.sampling_params import SamplingParams
from ember.structured.formats import ToolFormat, detect_format
from ember.structured.formats.base import ToolParser
from ember.structured.tools import Tool, ToolCall, normalize_tool_choice, normalize_tools
from ember.tokenizer import check_messages


@dataclass
class ChatPlan:
    messages: list[dict[str, Any]]  # what the template renders
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    tools: list[Tool] = field(default_factory=list)
    choice: str = "none"
    fmt: ToolFormat | None = None
    grammar: str | None = None  # constrains the reply when tools may be called

    @property
    def calls_tools(self) -> bool:
        return self.fmt is not None and self.choice != "none"

    def params(self, p: SamplingParams) -> SamplingParams:
        """The request's params with the tool grammar on, and special tokens kept in the text (several
        formats start a call with one)."""
        if not self.calls_tools:
            return p
        if p.structured is not None:
            raise ParameterError("tools: a structured output (response_format) and tools cannot be "
                                 "combined in one request; drop one, or set tool_choice to 'none'")
        structured = {"grammar": self.grammar} if self.grammar else None
        return dataclasses.replace(p, structured=structured, skip_special_tokens=False)

    def outputs(self) -> ToolOutputs | None:
        return ToolOutputs(self.fmt.parser(self.tools)) if self.calls_tools else None  # type: ignore[union-attr]


def plan_chat(messages: list[dict[str, Any]], tools: Sequence[Any] | None, tool_choice: Any,
              parallel_tool_calls: bool, chat_template: str | None, tokenizer: Any) -> ChatPlan:
    """Validate messages, tools and tool_choice (errors name the field) and plan the request."""
    check_messages(messages)
    if not isinstance(parallel_tool_calls, bool):
        raise ParameterError(f"parallel_tool_calls must be True or False, not {parallel_tool_calls!r}")
    norm = normalize_tools(tools) if tools else []
    choice = normalize_tool_choice(tool_choice, norm)
    history = any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
    if not norm and not history:
        return ChatPlan(list(messages))
    fmt = detect_format(chat_template)
    msgs, kwargs = fmt.prepare(list(messages), norm, choice)
    plan = ChatPlan(msgs, kwargs, norm, choice, fmt)
    if plan.calls_tools:
        plan.grammar = fmt.grammar(norm, choice, parallel_tool_calls, tokenizer)
    return plan


class ToolOutputs:
    """Turns a reply's outputs (raw text deltas) into content deltas + tool call deltas, one output at a
    time; the finish reason becomes "tool_calls" when the reply ended after calling tools."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self._joined: dict[int, ToolCall] = {}  # the deltas so far, joined per call index

    def __call__(self, out: RequestOutput) -> RequestOutput:
        delta = self.parser.feed(out.text)
        content, calls = delta.content, list(delta.tool_calls)
        reason = out.finish_reason
        if out.finished:
            tail = self.parser.close()
            content, calls = content + tail.content, calls + tail.tool_calls
            if reason == "stop" and self.parser.calls and not self.parser.incomplete:
                reason = "tool_calls"
        for d in calls:
            if d.index not in self._joined:
                self._joined[d.index] = ToolCall(d.id or "", d.name or "", "")
            self._joined[d.index].arguments += d.arguments
        return dataclasses.replace(out, text=content, tool_calls=calls, finish_reason=reason)

    @property
    def calls(self) -> list[ToolCall]:
        """The reply's calls, exactly as their streamed deltas join up. With finish_reason "length" the last one
        may be cut off (its arguments then do not parse); otherwise every call is complete and valid."""
        return [self._joined[i] for i in sorted(self._joined)]
