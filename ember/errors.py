"""User-facing errors: each carries a message that says what went wrong and how to fix it.

The CLI prints these without a traceback; anything else escaping is a bug in ember.
"""

from __future__ import annotations


class EmberError(Exception):
    """Base class for errors caused by user input (bad file, bad parameter, unknown model)."""


class ModelNotFoundError(EmberError):
    pass


class ModelFormatError(EmberError):
    """A model file is truncated, corrupt or uses something ember does not support."""


class ParameterError(EmberError, ValueError):
    """An invalid value for a named parameter (SamplingParams, EngineConfig, CLI option)."""


class TemplateError(EmberError):
    """The chat template is missing, broken, or raised an error (e.g. roles must alternate)."""


class ContextLengthError(EmberError):
    """The prompt (plus the tokens asked for) does not fit the model's context."""
