"""OpenAI request bodies, checked strictly: every field ember does not implement is a 400 naming it.

Silently dropped parameters are the pitfall this server exists to avoid: `best_of`, `suffix`, ... are
refused with a message that says so, never ignored. A field sent as null asks for nothing and is accepted.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from ember.errors import ParameterError
from ember.sampling_params import SamplingParams
from ember.server.body import APIError, Strict
from ember.server.protocol_structured import (
    ResponseFormat,
    StructuredOutputsBody,
    ToolCallBody,
    structured_of,
)


class StreamOptions(Strict):
    include_usage: bool = False


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallBody] | None = None  # an assistant turn that called tools (content may be null)
    tool_call_id: str | None = None  # a tool result answers this call

    @model_validator(mode="after")
    def _shape(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls may omit it)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def text(self) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def as_dict(self) -> dict[str, Any]:
        """The message as chat templates read it (developer -> system; tool call arguments stay JSON text)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class _Sampling(Strict):
    """Fields shared by both endpoints (OpenAI's, then ember's extensions)."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str | None = None
    top_k: int = Field(default=0, ge=0)  # extensions
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0)
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None  # vLLM's extension (the openai client's extra_body)

    def sampling(self, max_tokens: int | None, logprobs: int | None, index: int,
                 model_defaults: dict[str, Any] | None = None) -> SamplingParams:
        """The SamplingParams of choice `index` (with n > 1 and a seed, choice i uses seed + i). A knob the
        request leaves out takes the model's generation_config.json default, as transformers does."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4:
            raise APIError(400, f"stop: at most 4 sequences, got {len(stop)}", "stop")
        knobs = {k: getattr(self, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
        for k in knobs:
            if k not in self.model_fields_set and k in (model_defaults or {}):
                knobs[k] = model_defaults[k]  # type: ignore[index]
        if max_tokens is None:
            max_tokens = (model_defaults or {}).get("max_tokens")
        try:
            return SamplingParams(
                **knobs, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                seed=None if self.seed is None else self.seed + index, max_tokens=max_tokens, stop=stop,
                ignore_eos=self.ignore_eos, logprobs=logprobs, logit_bias=self.token_bias(),
                structured=structured_of(self.response_format, self.structured_outputs))
        except ParameterError as e:  # a bad schema / regex / grammar: name the field it came in
            if "SamplingParams.structured" not in str(e):
                raise  # the others name their field themselves ("SamplingParams.top_p=...")
            raise APIError(400, str(e), self.constraint_field, "invalid_value") from None

    @property
    def constraint_field(self) -> str:
        """The request field a structured-output constraint came in, for errors about it."""
        return "structured_outputs" if self.structured_outputs is not None else "response_format"

    def token_bias(self) -> dict[int, float] | None:
        """logit_bias's JSON keys (token ids as strings) -> ints; a key that is not one is a 400 naming it
        (the biases' range is SamplingParams' check)."""
        if not self.logit_bias:
            return None
        out: dict[int, float] = {}
        for key, value in self.logit_bias.items():
            try:
                tid = int(key)
            except ValueError:
                tid = -1
            if tid < 0 or str(tid) != key.strip():
                raise APIError(400, f"logit_bias: key {key!r} is not a token id (a non-negative integer)",
                               "logit_bias", "invalid_value")
            out[tid] = value
        return out

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None  # checked by ember.structured.tools (errors name the field)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _tool_arguments(self) -> ChatRequest:
        for i, m in enumerate(self.messages):
            for j, c in enumerate(m.tool_calls or []):
                try:
                    json.loads(c.function.arguments)
                except json.JSONDecodeError:
                    raise ValueError(f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON: "
                                     f"{c.function.arguments[:80]!r}") from None
        return self

    def limit(self) -> int | None:
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens disagree: give one", "max_completion_tokens")
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt is empty", "prompt")
        if all(isinstance(t, int) for t in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


def parse(model: type[Strict], body: Any) -> Any:
    """Validate a JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {field} (ember does not implement it; "
                                "it is refused rather than silently ignored)", field,
                           "unsupported_parameter") from None
        if not field:  # a rule over the whole body
            raise APIError(400, err["msg"].removeprefix("Value error, "), None, "invalid_value") from None
        raise APIError(400, f"{field}: {err['msg']}", field, "invalid_value") from None
