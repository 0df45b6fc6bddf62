"""What a request asks its output to be: a JSON schema, any JSON object, a regex, a grammar or a choice.

Each kind compiles to one llguidance grammar. Checks run at construction, without the model's vocabulary,
so a bad schema / regex / grammar fails before anything is queued, with the field and llguidance's reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import llguidance

from ember.errors import ParameterError

KINDS = ("json", "json_object", "regex", "grammar", "choice")

# Compact JSON with one space after ':' and ',' (the style models see most in training). Flexible whitespace
# lets a small model loop on newlines forever inside an object; a schema's own "x-guidance" still wins.
JSON_STYLE: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _fail(kind: str, what: str) -> None:
    raise ParameterError(f"SamplingParams.structured.{kind}: {what}")


def json_schema_of(value: Any, where: str) -> dict[str, Any]:
    """A JSON schema from a dict, its JSON text, or a pydantic model class."""
    if isinstance(value, type) and hasattr(value, "model_json_schema"):
        return value.model_json_schema()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ParameterError(f"{where}: the schema is not valid JSON: {e}") from None
    if isinstance(value, bool):  # `true` is the schema that accepts anything
        return {} if value else {"not": {}}
    if not isinstance(value, dict):
        raise ParameterError(f"{where}: a JSON schema must be a dict, its JSON text or a pydantic model class, "
                             f"not {type(value).__name__}")
    return value


def closed(schema: Any) -> Any:
    """A copy where every object schema that does not say otherwise has additionalProperties: false.

    Tool arguments are generated this way (OpenAI's strict function calling requires it): left open, a small
    model fills them with keys it copies from the schema itself. allOf branches stay open (closing one
    would forbid the properties another branch adds)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in ("allOf", "const", "enum", "default", "examples") else closed(v)) for k, v in schema.items()}
    props = schema.get("properties")
    if isinstance(props, dict):
        out["properties"] = {k: closed(v) for k, v in props.items()}
        required = schema.get("required") if isinstance(schema.get("required"), list) else []
        undeclared = any(k not in props for k in required)  # closing would make it unsatisfiable
        if not undeclared and not {"additionalProperties", "patternProperties", "allOf"} & set(schema):
            out["additionalProperties"] = False
    return out


def schema_grammar(schema: dict[str, Any], where: str) -> str:
    """llguidance grammar of a JSON schema in ember's JSON style; a schema llguidance rejects fails here."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)  # type: ignore[arg-type]
    except (ValueError, TypeError) as e:
        raise ParameterError(f"{where}: invalid JSON schema: {e}") from None
    _check(grammar, where, "invalid JSON schema")
    return grammar


def _check(grammar: str, where: str, what: str) -> None:
    err = llguidance.LLMatcher.validate_grammar(grammar)
    if err:
        raise ParameterError(f"{where}: {what}: {err.strip()}")


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one of: `json` (a JSON schema: dict, JSON text or pydantic model class), `json_object=True`
    (any JSON object), `regex` (the whole output matches it), `grammar` (Lark or GBNF text, or llguidance's
    JSON grammar) or `choice` (the output is exactly one of these strings)."""

    json: Any = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = None
    llg: str = field(init=False, repr=False, compare=False)  # the compiled llguidance grammar

    def __post_init__(self) -> None:
        given = self._given()
        if len(given) != 1:
            raise ParameterError(f"SamplingParams.structured: give exactly one of {', '.join(KINDS)}; "
                                 f"got {', '.join(given) if given else 'none'}")
        object.__setattr__(self, "llg", getattr(self, f"_compile_{given[0]}")())

    def _given(self) -> list[str]:
        return [k for k in KINDS if getattr(self, k) not in (None, False)]

    @property
    def kind(self) -> str:
        return self._given()[0]

    def _compile_json(self) -> str:
        where = "SamplingParams.structured.json"
        schema = json_schema_of(self.json, where)
        object.__setattr__(self, "json", schema)  # a pydantic class or JSON text becomes the schema dict
        return schema_grammar(schema, where)

    def _compile_json_object(self) -> str:
        if self.json_object is not True:
            _fail("json_object", f"must be True, not {self.json_object!r}")
        return schema_grammar({"type": "object"}, "SamplingParams.structured.json_object")

    def _compile_regex(self) -> str:
        if not isinstance(self.regex, str) or not self.regex:
            _fail("regex", f"must be a non-empty string, not {self.regex!r}")
        grammar = llguidance.grammar_from("regex", self.regex)  # type: ignore[arg-type]
        _check(grammar, "SamplingParams.structured.regex", "invalid regex")
        return grammar

    def _compile_grammar(self) -> str:
        if not isinstance(self.grammar, str) or not self.grammar.strip():
            _fail("grammar", "must be non-empty Lark or GBNF text")
        # llguidance's own JSON form ({"grammars": [...]}, what tool formats build) passes through as is
        kind = "llguidance" if self.grammar.lstrip().startswith("{") else "grammar"
        try:
            grammar = llguidance.grammar_from(kind, self.grammar)  # type: ignore[arg-type]
        except ValueError as e:  # GBNF that does not convert
            raise ParameterError(f"SamplingParams.structured.grammar: {e}") from None
        _check(grammar, "SamplingParams.structured.grammar", "invalid grammar (Lark or GBNF)")
        return grammar

    def _compile_choice(self) -> str:
        choice = self.choice
        if not isinstance(choice, (list, tuple)) or not choice or \
                not all(isinstance(c, str) and c for c in choice):
            _fail("choice", f"must be a non-empty list of non-empty strings, not {choice!r}")
        object.__setattr__(self, "choice", list(choice))  # type: ignore[arg-type]
        grammar = llguidance.grammar_from("choice", json.dumps(list(choice)))  # type: ignore[arg-type]
        _check(grammar, "SamplingParams.structured.choice", "invalid choice")
        return grammar


def as_structured(value: Any) -> StructuredOutputs | None:
    """SamplingParams.structured from what users write: a StructuredOutputs, a dict with one of its keys
    ({"json": schema}, {"regex": "..."}, ...) or a pydantic model class (its JSON schema)."""
    if value is None or isinstance(value, StructuredOutputs):
        return value
    if isinstance(value, type) and hasattr(value, "model_json_schema"):
        return StructuredOutputs(json=value)
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(KINDS))
        if unknown:
            raise ParameterError(
                f"SamplingParams.structured: unknown key(s) {', '.join(map(repr, unknown))}; give one of "
                f"{', '.join(KINDS)} (a JSON schema goes under 'json': {{'json': {{'type': 'object', ...}}}})")
        return StructuredOutputs(**value)
    raise ParameterError(f"SamplingParams.structured must be a StructuredOutputs, a dict with one of "
                         f"{', '.join(KINDS)}, or a pydantic model class; not {type(value).__name__}")
