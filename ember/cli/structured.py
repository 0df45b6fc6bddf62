"""`ember generate` options that constrain the output: --json-schema, --json, --regex, --choice, --grammar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ember.errors import EmberError

SchemaOpt = Annotated[Path | None, typer.Option(
    "--json-schema", help="Output JSON that validates against this JSON schema FILE.", rich_help_panel="Structured output")]
JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Output one JSON object (any keys).", rich_help_panel="Structured output")]
RegexOpt = Annotated[str | None, typer.Option(
    help="Output text that fully matches this regular expression.", rich_help_panel="Structured output")]
ChoiceOpt = Annotated[str | None, typer.Option(
    help="Output exactly one of these comma-separated strings, e.g. --choice yes,no,maybe.",
    rich_help_panel="Structured output")]
GrammarOpt = Annotated[Path | None, typer.Option(
    help="Output text in the language of this grammar FILE (Lark, or llama.cpp's GBNF).",
    rich_help_panel="Structured output")]


def structured_option(json_schema: Path | None, json_object: bool, regex: str | None, choice: str | None,
                      grammar: Path | None) -> dict[str, Any] | None:
    """The one constraint the options ask for (SamplingParams.structured), or None; files are read here."""
    given = [name for name, v in (("--json-schema", json_schema), ("--json", json_object), ("--regex", regex),
                                  ("--choice", choice), ("--grammar", grammar)) if v]
    if len(given) > 1:
        raise EmberError(f"give one of {', '.join(given)}: an output follows one constraint")
    if json_schema is not None:
        try:
            return {"json": json.loads(_read(json_schema, "--json-schema"))}
        except json.JSONDecodeError as e:
            raise EmberError(f"--json-schema {json_schema}: not valid JSON ({e})") from None
    if json_object:
        return {"json_object": True}
    if regex is not None:
        return {"regex": regex}
    if choice is not None:
        return {"choice": [c.strip() for c in choice.split(",") if c.strip()]}
    if grammar is not None:
        return {"grammar": _read(grammar, "--grammar")}
    return None


def _read(path: Path, option: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise EmberError(f"{option} {path}: cannot read it ({e.strerror})") from None
