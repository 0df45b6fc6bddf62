"""Prompts -> token ids without the weights: what a server's front end needs of a model.

`Frontend` holds the tokenizer, chat template, the model's sampling defaults and its context length. It
is picklable, so a Ray Serve ingress gets it from an engine replica instead of loading the model itself.
`LLM` encodes prompts with the same code (it is a `PromptEncoder` too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ember.errors import ParameterError
from ember.tokenizer import Tokenizer

Prompt = str | Sequence[int]
Messages = list[dict[str, Any]]


class PromptEncoder:
    """Text or token ids -> ids, and messages -> ids through the chat template. Needs `tokenizer` and
    `chat_template` (None: the tokenizer's own)."""

    tokenizer: Tokenizer
    chat_template: str | None

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ParameterError("a prompt must be a string or a list of token ids (ints)")
        return ids

    def encode_chat(self, messages: Messages, *, chat_template: str | None = None,
                    add_generation_prompt: bool = True, **template_kwargs: Any) -> list[int]:
        return self.tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt,
                                          chat_template=chat_template or self.chat_template, **template_kwargs)

    @property
    def template(self) -> str | None:
        """The chat template in use: the one given at load, else the model's."""
        return self.chat_template or self.tokenizer.chat_template


@dataclass
class Frontend(PromptEncoder):
    tokenizer: Tokenizer
    chat_template: str | None
    max_model_len: int
    generation_defaults: dict[str, Any] = field(default_factory=dict)
