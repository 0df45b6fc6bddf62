"""Tools a model may call: definitions (OpenAI dicts or Python functions) and the calls it makes.

Every tool becomes a `Tool` (name, description, JSON schema of its arguments object); bad input raises
ParameterError naming the exact field (`tools[1].function.name: ...`).
"""

from __future__ import annotations

import inspect
import json
import re
import secrets
import string
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import llguidance

from ember.errors import ParameterError
from ember.structured.spec import closed

_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_ID_CHARS = string.ascii_letters + string.digits
_FUNCTION_KEYS = ("name", "description", "parameters", "strict")
_EMPTY_PARAMS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object

    def __post_init__(self) -> None:
        _check_name(self.name, "Tool.name")
        if not isinstance(self.parameters, dict):
            raise ParameterError(f"Tool.parameters: must be a JSON schema dict, "
                                 f"not {type(self.parameters).__name__}")

    def openai(self) -> dict[str, Any]:
        fn = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": fn}


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of the arguments object, as generated

    def parsed_arguments(self) -> dict[str, Any]:
        return json.loads(self.arguments)

    def openai(self) -> dict[str, Any]:
        fn = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": fn}


@dataclass
class ToolCallDelta:
    """One streamed piece of a call, in OpenAI's shape: id and name come in a call's first delta only."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""  # a fragment; a call's fragments concatenate to its arguments JSON

    def openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        fn: dict[str, Any] = {}
        if self.id is not None:
            out["id"], out["type"] = self.id, "function"
        if self.name is not None:
            fn["name"] = self.name
        fn["arguments"] = self.arguments
        out["function"] = fn
        return out


@dataclass
class ChatDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


# ---- tool definitions -------------------------------------------------------------------------------
def normalize_tools(tools: Sequence[Any] | None, field: str = "tools") -> list[Tool]:
    """OpenAI tool dicts, bare {"name", "description", "parameters"} dicts, Tools or Python functions."""
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ParameterError(f"{field}: must be a list of tools, not {type(tools).__name__}")
    out: list[Tool] = []
    seen: dict[str, str] = {}
    for i, item in enumerate(tools):
        where = f"{field}[{i}]"
        if isinstance(item, Tool):
            params = _schema(item.parameters, f"{where}.parameters")
            tool, name_at = Tool(item.name, item.description, params), where
        elif isinstance(item, Mapping):
            tool, name_at = _from_dict(item, where)
        elif inspect.isfunction(item) or inspect.ismethod(item):
            tool, name_at = _from_function(item, where), where
        else:
            raise ParameterError(f"{where}: a tool is an OpenAI tool dict, a Tool or a Python function, "
                                 f"not {type(item).__name__}")
        if tool.name in seen:
            raise ParameterError(f"{name_at}.name: duplicate tool name {tool.name!r} "
                                 f"({seen[tool.name]} has it too)")
        seen[tool.name] = where
        out.append(tool)
    return out


def _from_dict(d: Mapping[str, Any], where: str) -> tuple[Tool, str]:
    if "function" in d or ("type" in d and "name" not in d):  # {"type": "function", "function": {...}}
        _no_unknown(d, ("type", "function"), where)
        if d.get("type") != "function":
            raise ParameterError(f"{where}.type: only 'function' tools are supported, got {d.get('type')!r}")
        fn, where = d.get("function"), f"{where}.function"
        if not isinstance(fn, Mapping):
            raise ParameterError(f"{where}: must be a dict with 'name', 'description' and 'parameters'")
    else:  # a bare function dict (or the flat {"type": "function", "name": ...} form)
        fn = d
        if "type" in d and d["type"] != "function":
            raise ParameterError(f"{where}.type: only 'function' tools are supported, got {d['type']!r}")
    _no_unknown(fn, (*_FUNCTION_KEYS, *(("type",) if fn is d else ())), where)
    name = fn.get("name")
    _check_name(name, f"{where}.name")
    desc = fn.get("description") or ""
    if not isinstance(desc, str):
        raise ParameterError(f"{where}.description: must be a string, not {type(desc).__name__}")
    if fn.get("strict") not in (None, True, False):
        raise ParameterError(f"{where}.strict: must be true or false, got {fn.get('strict')!r}")
    params = fn.get("parameters")
    params = _schema(_EMPTY_PARAMS if params is None else params, f"{where}.parameters")
    return Tool(name, desc, params), where


def _no_unknown(d: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    extra = [k for k in d if k not in known]
    if extra:
        raise ParameterError(f"{where}.{extra[0]}: unknown field (allowed: {', '.join(known)})")


def _check_name(name: Any, where: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ParameterError(f"{where}: a tool name is 1-64 characters of a-z, A-Z, 0-9, '_' and '-'; "
                             f"got {name!r}")


def _schema(params: Any, where: str) -> dict[str, Any]:
    """A private copy of an arguments schema, checked by llguidance."""
    if not isinstance(params, Mapping):
        raise ParameterError(f"{where}: must be a JSON schema dict, not {type(params).__name__}")
    try:
        params = json.loads(json.dumps(params))
    except (TypeError, ValueError) as e:
        raise ParameterError(f"{where}: not JSON-serializable: {e}") from None
    kind = params.setdefault("type", "object")  # the arguments are always an object
    if kind != "object":
        raise ParameterError(f"{where}: the arguments schema must have \"type\": \"object\", got {kind!r}")
    try:  # as it will be generated: closed (ember.structured.spec.closed)
        err = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_json_schema(closed(params)))
    except (TypeError, ValueError) as e:
        err = str(e)
    if err:
        raise ParameterError(f"{where}: invalid JSON schema: {err.strip()}")
    return params


def normalize_tool_choice(choice: Any, tools: list[Tool], field: str = "tool_choice") -> str:
    """"none" | "auto" | "required" | a tool's name, from OpenAI's forms (or a bare tool name)."""
    names = [t.name for t in tools]
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice in ("none", "auto") or (choice == "required" and tools):
            return choice if tools else "none"  # nothing to call
        if choice in names:
            return choice
        if not tools:
            raise ParameterError(f"{field}: {choice!r} needs tools, but no tools were given")
        raise ParameterError(f"{field}: must be 'none', 'auto', 'required' or the name of a tool "
                             f"({', '.join(names)}); got {choice!r}")
    if not isinstance(choice, Mapping):
        raise ParameterError(f"{field}: must be a string or {{\"type\": \"function\", \"function\": "
                             f"{{\"name\": ...}}}}, not {type(choice).__name__}")
    if choice.get("type") != "function":
        raise ParameterError(f"{field}.type: must be 'function', got {choice.get('type')!r}")
    fn, where = choice.get("function"), f"{field}.function"
    if fn is None and "name" in choice:  # the flat {"type": "function", "name": ...} form
        fn, where = choice, field
    _no_unknown(choice, ("type", "function") if where != field else ("type", "name"), field)
    if not isinstance(fn, Mapping):
        raise ParameterError(f"{where}: must be a dict with the function's 'name'")
    _no_unknown(fn, ("name",) if where != field else ("type", "name"), where)
    name = fn.get("name")
    if not tools:
        raise ParameterError(f"{where}.name: names a function ({name!r}) but no tools were given")
    if name not in names:
        raise ParameterError(f"{where}.name: no tool is named {name!r} (tools: {', '.join(names)})")
    return name


# ---- Python functions -------------------------------------------------------------------------------
def _from_function(fn: Callable[..., Any], where: str) -> Tool:
    name = getattr(fn, "__name__", type(fn).__name__)
    where = f"{where} (function {name})"
    _check_name(name, f"{where}: its name")
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception as e:  # an unresolvable forward reference
        raise ParameterError(f"{where}: cannot resolve its type hints: {e}") from None
    summary, arg_docs = parse_docstring(inspect.getdoc(fn) or "")
    from pydantic import TypeAdapter  # (comes with fastapi) imported only when a function is given

    props: dict[str, Any] = {}
    defs: dict[str, Any] = {}
    required: list[str] = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ParameterError(f"{where}: *{p.name} / **{p.name} cannot be described to a model; "
                                 "tool functions take named parameters only")
        if p.name not in hints:
            raise ParameterError(f"{where}: parameter {p.name!r} has no type hint (e.g. `{p.name}: str`)")
        try:
            adapter = TypeAdapter(hints[p.name])
            schema = adapter.json_schema()
        except Exception as e:
            raise ParameterError(f"{where}: parameter {p.name!r}: no JSON schema for its type: {e}") from None
        for k, v in schema.pop("$defs", {}).items():
            if defs.setdefault(k, v) != v:
                raise ParameterError(f"{where}: two different types are both named {k!r}; rename one")
        if p.name in arg_docs and "description" not in schema:
            schema["description"] = arg_docs[p.name]
        if p.default is p.empty:
            required.append(p.name)
        else:
            try:
                schema["default"] = adapter.dump_python(p.default, mode="json")
            except Exception:  # a default JSON cannot show (an object): leave it out
                pass
        props[p.name] = schema
    params: dict[str, Any] = {"type": "object", "properties": props, "required": required}
    if defs:
        params["$defs"] = defs
    return Tool(name, summary, _schema(params, f"{where}: its parameters"))


_SECTION = re.compile(r"(Args|Arguments|Parameters|Params|Keyword Args|Returns?|Yields?|Raises|Examples?|"
                      r"Notes?|Attributes|See Also|Todo)\s*:\s*$")
_ARG = re.compile(r"\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)")


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Google style: (the text before the first section, {parameter: its description under Args:})."""
    lines = inspect.cleandoc(doc).splitlines()
    head: list[str] = []
    args: dict[str, str] = {}
    section: str | None = None
    current: str | None = None
    arg_indent = 0
    for line in lines:
        m = _SECTION.fullmatch(line.strip()) if not line[:1].isspace() else None
        if m:
            section, current = m.group(1), None
        elif section is None:
            head.append(line.strip())
        elif section in ("Args", "Arguments", "Parameters", "Params", "Keyword Args") and line.strip():
            entry = _ARG.fullmatch(line.strip())
            indent = len(line) - len(line.lstrip())
            if entry and (current is None or indent <= arg_indent):
                current, arg_indent = entry.group(1), indent
                args[current] = entry.group(2).strip()
            elif current is not None:  # a continuation line
                args[current] = f"{args[current]} {line.strip()}".strip()
    paragraphs = " ".join(x if x else "\n\n" for x in head).split("\n\n")
    summary = "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())
    return summary, args
