"""Request bodies that constrain the output: OpenAI's response_format, vLLM's structured_outputs, and the
shape of past tool calls. Each becomes one SamplingParams.structured (ember.structured.spec)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ember.server.body import APIError, Strict


class JsonSchemaFormat(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default=True, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only then")
        return self


class StructuredOutputsBody(Strict):
    """vLLM's `structured_outputs` extension: exactly one of these."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class ToolCallFunction(Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallBody(Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


def structured_of(fmt: ResponseFormat | None, so: StructuredOutputsBody | None) -> dict[str, Any] | None:
    """The constraint a request asks for (SamplingParams.structured), or None for plain text."""
    asked = fmt is not None and fmt.type != "text"
    if asked and so is not None:
        raise APIError(400, "give response_format or structured_outputs, not both", "structured_outputs")
    if so is not None:
        kinds = {k: v for k, v in (("json", so.json_), ("json_object", so.json_object), ("regex", so.regex),
                                   ("choice", so.choice), ("grammar", so.grammar)) if v not in (None, False)}
        if len(kinds) != 1:
            raise APIError(400, "structured_outputs: give exactly one of json, json_object, regex, choice, grammar",
                           "structured_outputs", "invalid_value")
        return kinds
    if not asked:
        return None
    assert fmt is not None
    if fmt.type == "json_object":
        return {"json_object": True}
    assert fmt.json_schema is not None
    return {"json": fmt.json_schema.schema_}
