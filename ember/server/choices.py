"""One chat choice, assembled from the engine's outputs: the streamed deltas and the whole message come from
the same code, so the non-streaming answer is exactly the joined stream (content, tool calls, finish)."""

from __future__ import annotations

from typing import Any

from ember.engine.outputs import RequestOutput
from ember.engine.sampler import TokenLogprobs
from ember.structured.chat import ToolOutputs


class ChatChoice:
    def __init__(self, index: int, tools: ToolOutputs | None) -> None:
        self.index, self.tools = index, tools
        self.content = ""
        self.logprobs: list[TokenLogprobs] = []
        self.last: RequestOutput | None = None  # the raw output (usage, finish) of the latest step

    def step(self, out: RequestOutput) -> dict[str, Any] | None:
        """The OpenAI delta of one engine output ({"content", "tool_calls"}), or None when it adds nothing."""
        if self.tools is not None:
            out = self.tools(out)
        self.last = out
        self.content += out.text
        self.logprobs += out.logprobs or []
        delta: dict[str, Any] = {}
        if out.text or out.logprobs:
            delta["content"] = out.text
        if out.tool_calls:
            delta["tool_calls"] = [d.openai() for d in out.tool_calls]
        return delta or None

    @property
    def finish_reason(self) -> str:
        return (self.last.finish_reason or "abort") if self.last else "abort"

    def message(self) -> dict[str, Any]:
        """The whole assistant message: the joined deltas (a call cut off by max_tokens is there as far as it
        got, and finish_reason says "length"); content is null beside tool calls when there is none."""
        calls = self.tools.calls if self.tools is not None else []
        msg: dict[str, Any] = {"role": "assistant", "content": self.content if self.content or not calls else None}
        if calls:
            msg["tool_calls"] = [c.openai() for c in calls]
        return msg
