"""Tokenizer: a `tokenizers` backend plus BOS/EOS policy and the Jinja chat template (HF conventions)."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import tokenizers
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ember.errors import ModelFormatError, ParameterError, TemplateError

# Token texts that end a turn or a document; a generation stops on any of them that the vocabulary has.
_END_OF_TURN = (
    "<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|eom_id|>", "<|endoftext|>",
    "<|end_of_text|>", "<EOT>", "<|END_OF_TURN_TOKEN|>", "<|return|>",
)  # fmt: skip
_CONTROL = 3
# Bump when gguf_tokenizer's construction changes, so stale cached tokenizer.json files are not reused.
_CACHE_VERSION = "1"

_NO_TEMPLATE = (
    "this model has no chat template, so chat messages cannot be formatted. Pass one with "
    "`chat_template=` (a Jinja template string or file; CLI: `--chat-template FILE`), pick a built-in "
    "one (`chatml` or `plain`), or use plain text generation (`generate`) with a prompt you format yourself."
)


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        add_bos: bool,
        chat_template: str | None,
        extra_eos_ids: Iterable[int] = (),
    ) -> None:
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.bos_token = self._token_or_none(bos_token_id)
        self.eos_token = self._token_or_none(eos_token_id)
        self.add_bos = add_bos and bos_token_id is not None
        self.chat_template = chat_template
        added = backend.get_added_tokens_decoder()
        self.special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        eos = {i for i in (eos_token_id, *extra_eos_ids) if i is not None}
        for text in _END_OF_TURN:
            i = backend.token_to_id(text)
            # Control tokens always count; other spellings only when the template writes them.
            if i is not None and (i in self.special_ids or (chat_template and text in chat_template)):
                eos.add(i)
        self.eos_token_ids: frozenset[int] = frozenset(eos)

    @classmethod
    def from_gguf_metadata(cls, md: Mapping[str, Any], cache_dir: Path | None = None) -> Tokenizer:
        from ember.weights.gguf_tokenizer import build_tokenizer

        cache_path = None
        if cache_dir is not None:
            cache_path = Path(cache_dir) / f"{md.get('tokenizer.ggml.model')}-{_vocab_digest(md)}.json"
        backend = build_tokenizer(md, cache_path=cache_path)
        model = md.get("tokenizer.ggml.model")
        # llama.cpp's defaults when the flag is absent: SentencePiece vocabularies want BOS, BPE ones do not.
        add_bos = bool(md.get("tokenizer.ggml.add_bos_token", model == "llama"))
        extra = [md.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        return cls(
            backend,
            bos_token_id=_int_or_none(md.get("tokenizer.ggml.bos_token_id")),
            eos_token_id=_int_or_none(md.get("tokenizer.ggml.eos_token_id")),
            add_bos=add_bos,
            chat_template=md.get("tokenizer.chat_template") or None,
            extra_eos_ids=[i for i in map(_int_or_none, extra) if i is not None],
        )

    @classmethod
    def from_hf_dir(cls, path: Path, extra_eos_ids: Iterable[int] = ()) -> Tokenizer:
        """tokenizer.json + tokenizer_config.json (special tokens, chat template; or chat_template.jinja)."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ModelFormatError(f"{path}: tokenizer.json is missing (ember reads fast tokenizers; convert a "
                                   f"slow one with transformers: AutoTokenizer.from_pretrained(...).save_pretrained)")
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        from ember.weights.hf import read_json

        cfg = read_json(path / "tokenizer_config.json", default={})

        def special(key: str) -> int | None:
            tok = cfg.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            return backend.token_to_id(tok) if isinstance(tok, str) else None

        bos = special("bos_token")
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:  # what the fast tokenizer's own post-processor does
            add_bos = bos is not None and backend.encode("a", add_special_tokens=True).ids[:1] == [bos]
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(backend, bos_token_id=bos, eos_token_id=special("eos_token"), add_bos=bool(add_bos),
                   chat_template=template, extra_eos_ids=extra_eos_ids)

    # ---- ids <-> text -------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ParameterError(f"text to encode must be a string, not {type(text).__name__}")
        ids: list[int] = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)  # type: ignore[arg-type]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        tok = self.backend.id_to_token(i)
        if tok is None:
            raise ParameterError(f"token id {i} is out of range for a vocabulary of {self.vocab_size}")
        return tok

    def _token_or_none(self, i: int | None) -> str | None:
        return None if i is None else self.backend.id_to_token(i)

    # ---- chat ---------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        template = chat_template if chat_template is not None else self.chat_template
        if not template:
            raise TemplateError(_NO_TEMPLATE)
        check_messages(messages)
        compiled = _compile(template)
        context = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            **kwargs,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return compiled.render(**context)
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template failed: {e}") from None
        except Exception as e:  # a template bug (e.g. str + None) is still the template's fault
            raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from None

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> list[int]:
        text = self.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, chat_template=chat_template, **kwargs
        )
        # encode() adds BOS only when the rendered text does not already start with it.
        return self.encode(text, add_special_tokens=True)


# ---- helpers --------------------------------------------------------------------------------------
def _int_or_none(v: Any) -> int | None:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def _vocab_digest(md: Mapping[str, Any]) -> str:
    """Content hash of everything build_tokenizer reads, naming the cache file."""
    h = hashlib.sha256(_CACHE_VERSION.encode())
    for key in ("model", "pre", "add_space_prefix", "unknown_token_id"):
        h.update(repr(md.get(f"tokenizer.ggml.{key}")).encode() + b"\x00")
    for key in ("tokens", "merges"):
        h.update(
            "\x00".join(md.get(f"tokenizer.ggml.{key}") or ()).encode("utf-8", "surrogatepass") + b"\x01"
        )
    for key, dtype in (("scores", np.float64), ("token_type", np.int64)):
        h.update(np.asarray(md.get(f"tokenizer.ggml.{key}") or [], dtype=dtype).tobytes() + b"\x01")
    return h.hexdigest()[:24]


def check_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)):
        raise ParameterError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, not {type(messages).__name__}"
        )
    for n, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ParameterError(
                f"messages[{n}] must be a dict with 'role' and 'content', not {type(m).__name__}"
            )
        if not isinstance(m.get("role"), str):
            raise ParameterError(f"messages[{n}] needs a string 'role' (e.g. 'user'), got {m.get('role')!r}")
        calls = m.get("tool_calls")
        if calls is not None and (not isinstance(calls, (list, tuple)) or not all(
                isinstance(c, Mapping) or hasattr(c, "openai") for c in calls)):
            raise ParameterError(f"messages[{n}].tool_calls must be a list of tool calls "
                                 "({'id', 'type': 'function', 'function': {'name', 'arguments'}})")
        content = m.get("content")
        # Assistant tool-call turns may carry no text.
        if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
            raise ParameterError(f"messages[{n}] needs a string 'content', got {type(content).__name__}")


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template error: {message}")


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    # Unlike Jinja's built-in tojson: keeps non-ASCII text and does not HTML-escape.
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(Extension):
    """Accepts HF's `{% generation %}...{% endgeneration %}` marker and renders its body as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template has a syntax error on line {e.lineno}: {e.message}") from None
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template is invalid: {e}") from None
