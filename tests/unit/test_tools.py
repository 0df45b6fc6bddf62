"""Tool definitions: OpenAI dicts, bare dicts, Tools and Python functions → Tool; tool_choice; call types."""

from __future__ import annotations

import enum
import json
import re
from typing import Literal, Optional, Union

import llguidance
import pytest
from pydantic import BaseModel

from ember.errors import ParameterError
from ember.structured.tools import (
    ChatDelta,
    Tool,
    ToolCall,
    ToolCallDelta,
    normalize_tool_choice,
    normalize_tools,
    parse_docstring,
)

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


class Unit(enum.Enum):
    C = "celsius"
    F = "fahrenheit"


class Place(BaseModel):
    city: str
    country: str = "FR"


def get_weather(city: str, days: int, extra: dict, unit: Unit = Unit.C, hourly: bool = False,
                precision: float = 0.5, tags: list[str] | None = None, mode: Literal["fast", "slow"] = "fast",
                near: Optional[Place] = None, key: Union[int, str] = 0) -> str:  # noqa: UP007, UP045 (the typing spellings on purpose)
    """Get the weather forecast
    for a city.

    Uses the national service.

    Args:
        city: Name of the city,
            in English.
        days (int): How many days ahead.
        unit: Temperature unit.
        hourly: Hour by hour.
        mode: Speed.

    Returns:
        The forecast.
    """
    return ""


def test_function_schema_field_by_field() -> None:
    (tool,) = normalize_tools([get_weather])
    assert tool.name == "get_weather"
    assert tool.description == "Get the weather forecast for a city.\n\nUses the national service."
    p = tool.parameters
    assert p["type"] == "object"
    assert p["required"] == ["city", "days", "extra"]
    props = p["properties"]
    assert list(props) == ["city", "days", "extra", "unit", "hourly", "precision", "tags", "mode", "near",
                           "key"]
    assert props["city"] == {"type": "string", "description": "Name of the city, in English."}
    assert props["days"] == {"type": "integer", "description": "How many days ahead."}
    assert props["unit"]["enum"] == ["celsius", "fahrenheit"] and props["unit"]["default"] == "celsius"
    assert props["unit"]["description"] == "Temperature unit."
    assert props["hourly"] == {"type": "boolean", "description": "Hour by hour.", "default": False}
    assert props["precision"] == {"type": "number", "default": 0.5}
    assert props["tags"]["anyOf"] == [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]
    assert props["mode"]["enum"] == ["fast", "slow"] and props["mode"]["description"] == "Speed."
    assert props["extra"] == {"type": "object", "additionalProperties": True}
    assert props["key"]["default"] == 0 and props["near"]["default"] is None
    assert props["key"]["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    # the pydantic model's schema sits in the tool's $defs, and its ref resolves
    ref = props["near"]["anyOf"][0]["$ref"]
    assert ref == "#/$defs/Place" and p["$defs"]["Place"]["required"] == ["city"]
    assert "returns" not in json.dumps(p).lower()
    assert llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_json_schema(p)) == ""


def test_docstring_parsing() -> None:
    summary, args = parse_docstring("""Do it.

    Args:
        a (int, optional): first
            continued
        *rest: others
        b: second

    Raises:
        ValueError: never
    """)
    assert summary == "Do it."
    assert args == {"a": "first continued", "rest": "others", "b": "second"}
    assert parse_docstring("") == ("", {})


def test_openai_dict_and_bare_dict_and_tool() -> None:
    tools = normalize_tools([
        {"type": "function",
         "function": {"name": "a", "description": "A.", "parameters": WEATHER, "strict": True}},
        {"name": "b", "description": "B."},
        {"type": "function", "name": "c", "parameters": WEATHER},  # the flat (Responses API) form
        Tool("d", "D.", WEATHER),
    ])
    assert [t.name for t in tools] == ["a", "b", "c", "d"]
    assert tools[0].parameters == WEATHER and tools[0].parameters is not WEATHER  # a private copy
    assert tools[1].parameters == {"type": "object", "properties": {}}  # missing parameters: no arguments
    assert tools[1].description == "B." and tools[2].description == ""
    assert tools[0].openai() == {"type": "function", "function": {"name": "a", "description": "A.",
                                                                  "parameters": WEATHER}}
    assert normalize_tools(None) == [] and normalize_tools([]) == []
    # a schema without "type" is an object schema
    (e,) = normalize_tools([{"name": "e", "parameters": {"properties": {}}}])
    assert e.parameters == {"type": "object", "properties": {}}


def _no_hint(city):  # type: ignore[no-untyped-def]
    return city


def _star(*names: str) -> None:
    pass


def _kw(**options: int) -> None:
    pass


@pytest.mark.parametrize(("tools", "where"), [
    ("get_weather", "tools: must be a list"),
    ({"name": "a"}, "tools: must be a list"),
    ([{"name": "a"}, {"type": "function", "function": {"name": "bad name"}}], "tools[1].function.name: "),
    ([{"type": "function", "function": {"name": "x" * 65}}], "tools[0].function.name: "),
    ([{"type": "function", "function": {"description": "no name"}}], "tools[0].function.name: "),
    ([{"type": "function", "function": {"name": "a", "parameters": {"type": "object", "properties": {
        "x": {"type": "strin"}}}}}],
     "tools[0].function.parameters: invalid JSON schema: Invalid type: strin"),
    ([{"type": "function", "function": {"name": "a", "parameters": {"type": "string"}}}],
     "tools[0].function.parameters: the arguments schema must have"),
    ([{"type": "function", "function": {"name": "a", "parameters": []}}], "tools[0].function.parameters: "),
    ([{"name": "a", "parameters": {"properties": {"x": {"$ref": "#/$defs/Nope"}}}}],
     "tools[0].parameters: invalid JSON schema"),
    ([{"name": "a"}, {"name": "b"}, {"type": "function", "function": {"name": "a"}}],
     "tools[2].function.name: duplicate tool name 'a' (tools[0] has it too)"),
    ([{"type": "function", "function": {"name": "a", "foo": 1}}], "tools[0].function.foo: unknown field"),
    ([{"type": "function", "function": {"name": "a"}, "extra": 1}], "tools[0].extra: unknown field"),
    ([{"type": "retrieval", "function": {"name": "a"}}], "tools[0].type: only 'function'"),
    ([{"type": "function", "function": "a"}], "tools[0].function: must be a dict"),
    ([{"name": "a", "description": 3}], "tools[0].description: must be a string"),
    ([{"name": "a", "strict": "yes"}], "tools[0].strict: "),
    ([{"name": "a", "parameters": {"type": "object", "default": {1, 2}}}], "tools[0].parameters: not JSON"),
    ([get_weather, 42], "tools[1]: a tool is"),
    ([_no_hint], "tools[0] (function _no_hint): parameter 'city' has no type hint"),
    ([_star], "tools[0] (function _star): *names"),
    ([_kw], "tools[0] (function _kw): *options / **options"),
    ([lambda x: x], "tools[0] (function <lambda>): its name"),
])
def test_errors_name_the_field(tools: object, where: str) -> None:
    with pytest.raises(ParameterError) as e:
        normalize_tools(tools)  # type: ignore[arg-type]
    assert str(e.value).startswith(where), str(e.value)


def test_error_field_prefix_is_configurable() -> None:
    with pytest.raises(ParameterError, match=r"^functions\[0\]\.name: "):
        normalize_tools([{"name": "a b"}], field="functions")


def test_tool_checks_itself() -> None:
    with pytest.raises(ParameterError, match="^Tool.name: "):
        Tool("no spaces allowed", "", WEATHER)
    with pytest.raises(ParameterError, match="^Tool.parameters: "):
        Tool("ok", "", "not a schema")  # type: ignore[arg-type]


TOOLS = normalize_tools([{"name": "get_weather", "parameters": WEATHER}, {"name": "search"}])


@pytest.mark.parametrize(("choice", "tools", "want"), [
    (None, TOOLS, "auto"),
    (None, [], "none"),
    ("auto", TOOLS, "auto"),
    ("auto", [], "none"),  # nothing to call
    ("none", TOOLS, "none"),
    ("required", TOOLS, "required"),
    ("search", TOOLS, "search"),  # a bare function name
    ({"type": "function", "function": {"name": "get_weather"}}, TOOLS, "get_weather"),
    ({"type": "function", "name": "search"}, TOOLS, "search"),
])
def test_tool_choice(choice: object, tools: list[Tool], want: str) -> None:
    assert normalize_tool_choice(choice, tools) == want


@pytest.mark.parametrize(("choice", "tools", "msg"), [
    ("required", [], "tool_choice: 'required' needs tools"),
    ("lookup", TOOLS,
     "tool_choice: must be 'none', 'auto', 'required' or the name of a tool (get_weather, search)"),
    ({"type": "function", "function": {"name": "lookup"}}, TOOLS,
     "tool_choice.function.name: no tool is named 'lookup'"),
    ({"type": "function", "function": {"name": "search"}}, [], "tool_choice.function.name: names a function"),
    ({"type": "tool", "function": {"name": "search"}}, TOOLS, "tool_choice.type: must be 'function'"),
    ({"type": "function", "function": "search"}, TOOLS, "tool_choice.function: must be a dict"),
    ({"type": "function", "function": {"name": "search", "x": 1}}, TOOLS, "tool_choice.function.x: unknown"),
    (3, TOOLS, "tool_choice: must be a string or"),
])
def test_tool_choice_errors(choice: object, tools: list[Tool], msg: str) -> None:
    with pytest.raises(ParameterError) as e:
        normalize_tool_choice(choice, tools)
    assert str(e.value).startswith(msg), str(e.value)


def test_call_types() -> None:
    call = ToolCall("call_x", "get_weather", '{"city": "Paris"}')
    assert call.parsed_arguments() == {"city": "Paris"}
    assert call.openai() == {"id": "call_x", "type": "function",
                             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    first = ToolCallDelta(0, "call_x", "get_weather")
    assert first.openai() == {"index": 0, "id": "call_x", "type": "function",
                              "function": {"name": "get_weather", "arguments": ""}}
    assert ToolCallDelta(1, arguments='{"a').openai() == {"index": 1, "function": {"arguments": '{"a'}}
    assert ChatDelta() == ChatDelta("", [])


def test_call_ids_come_from_the_parser() -> None:
    from ember.structured.formats import get_format

    p = get_format("hermes").parser(TOOLS)
    p.feed('<tool_call>\n{"name": "search", "arguments": {}}\n</tool_call><tool_call>\n{"name": "search", '
           '"arguments": {}}\n</tool_call>')
    p.close()
    ids = [c.id for c in p.calls]
    assert len(ids) == 2 and ids[0] != ids[1]
    assert all(re.fullmatch(r"call_[a-zA-Z0-9]{24}", i) for i in ids)
