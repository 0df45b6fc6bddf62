"""Tool-call formats, one per model family; `detect_format` picks one from the chat template."""

from __future__ import annotations

from ember.errors import ParameterError
from ember.structured.formats.base import ToolFormat, ToolParser
from ember.structured.formats.generic import GenericFormat
from ember.structured.formats.hermes import HermesFormat
from ember.structured.formats.llama3 import Llama3Format
from ember.structured.formats.mistral import MistralFormat

# Checked in order; hermes first (Hermes fine-tunes of Llama keep Llama's other markers), generic last.
FORMATS: tuple[type[ToolFormat], ...] = (HermesFormat, MistralFormat, Llama3Format, GenericFormat)

__all__ = ["FORMATS", "ToolFormat", "ToolParser", "detect_format", "get_format"]


def detect_format(template: str | None) -> ToolFormat:
    return next((f() for f in FORMATS if f.detect(template)), GenericFormat())


def get_format(name: str) -> ToolFormat:
    for f in FORMATS:
        if f.name == name:
            return f()
    raise ParameterError(f"tool format: unknown {name!r} (known: {', '.join(f.name for f in FORMATS)})")
