"""What the engine hands back: a stream of RequestOutput deltas, joined into CompletionOutput."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ember.engine.sampler import TokenLogprobs

if TYPE_CHECKING:
    from ember.structured.tools import ToolCall, ToolCallDelta


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RequestOutput:
    """One engine step's news for one request: the text and tokens added since the last one."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    usage: Usage
    logprobs: list[TokenLogprobs] | None = None
    # With tools: `text` is the reply's content and these are the tool calls' deltas (OpenAI's shape)
    tool_calls: list[ToolCallDelta] | None = None

    def joined(self, later: RequestOutput) -> RequestOutput:
        """This delta and a later one of the same request, as one (fewer messages to send)."""

        def cat(a: list | None, b: list | None) -> list | None:
            return None if a is None and b is None else (a or []) + (b or [])

        return RequestOutput(self.request_id, self.text + later.text, self.token_ids + later.token_ids,
                             later.finished, later.finish_reason, later.usage, cat(self.logprobs, later.logprobs),
                             cat(self.tool_calls, later.tool_calls))


@dataclass
class CompletionOutput:
    """A whole generation: what generate() and chat(stream=False) return."""

    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprobs] | None = None
    tool_calls: list[ToolCall] | None = None  # chat(..., tools=...): the complete calls; text is the content

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.token_ids.extend(out.token_ids)
        if out.logprobs is not None:
            self.logprobs = (self.logprobs or []) + out.logprobs
        self.finish_reason, self.usage = out.finish_reason, out.usage
