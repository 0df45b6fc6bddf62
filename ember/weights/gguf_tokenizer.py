"""A `tokenizers.Tokenizer` built from the vocabulary stored in a GGUF file's metadata."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from ember.errors import ModelFormatError
from ember.weights.gguf_header import read_gguf_metadata  # noqa: F401  (re-exported)

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SUPPORTED_MODELS = ("gpt2", "llama")


# --- tokenizer construction ------------------------------------------------------------------------

_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> scheme; names llama.cpp gives to the same split rules share one scheme.
_PRE_SCHEMES = {
    "default": "gpt2", "gpt2": "gpt2",
    "smollm": "digits", "starcoder": "digits", "refact": "digits",
    "llama-bpe": "llama3", "llama3": "llama3", "dbrx": "llama3", "smaug-bpe": "llama3",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2",
}  # fmt: skip


def _byte_level_pre(pre: str, add_prefix_space: bool) -> tuple[Any, Any]:
    """(normalizer, pre_tokenizer) for a byte-level BPE vocabulary."""
    scheme = _PRE_SCHEMES.get(pre)
    if scheme is None:
        warnings.warn(
            f"unknown GGUF pre-tokenizer {pre!r}; falling back to GPT-2 byte-level splitting, "
            "so tokenization may differ slightly from the original model",
            stacklevel=3,
        )
        scheme = "gpt2"
    byte_level = pre_tokenizers.ByteLevel(
        add_prefix_space=add_prefix_space, use_regex=scheme in ("gpt2", "digits")
    )
    if scheme == "gpt2":
        return None, byte_level
    if scheme == "digits":
        return None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    regex = _LLAMA3_RE if scheme == "llama3" else _QWEN2_RE
    split = pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)
    return (normalizers.NFC() if scheme == "qwen2" else None), pre_tokenizers.Sequence([split, byte_level])


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        # The first id of a repeated string is kept so encoding matches llama.cpp's text->id map.
        vocab = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)
        warnings.warn(f"GGUF vocabulary has {len(tokens) - len(vocab)} duplicate token strings", stacklevel=4)
    return vocab


def _build_gpt2(md: Mapping[str, Any]) -> Tokenizer:
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges") or ()]
    try:
        tok = Tokenizer(BPE(_vocab(tokens), merges, fuse_unk=False, byte_fallback=False))
    except Exception as e:  # e.g. a merge naming a token that is not in the vocabulary
        raise ModelFormatError(f"GGUF BPE vocabulary/merges are inconsistent: {e}") from e
    normalizer, pre = _byte_level_pre(
        str(md.get("tokenizer.ggml.pre") or "default"), bool(md.get("tokenizer.ggml.add_space_prefix", False))
    )
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    return tok


def spm_merges(tokens: list[str], scores: list[float], types: list[int] | None) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split (a, b) of a normal token where a
    and b are tokens too, ranked by the score of a+b, best first (SentencePiece merges the
    highest-scoring adjacent pair). Ties keep id order; splits of one token go shortest left first."""
    vocab = set(tokens)
    # Only normal pieces are reachable by merging; control/user/byte tokens are matched whole.
    candidates = (i for i, t in enumerate(tokens) if len(t) > 1 and (types is None or types[i] == NORMAL))
    order = sorted(candidates, key=scores.__getitem__, reverse=True)  # stable, so ties stay in id order
    merges: list[tuple[str, str]] = []
    append = merges.append
    for i in order:  # hot loop (~1M splits for a 262k vocabulary): keep it minimal
        tok = tokens[i]
        for k in range(1, len(tok)):
            left = tok[:k]
            if left in vocab:
                right = tok[k:]
                if right in vocab:
                    append((left, right))
    return merges


def _build_llama(md: Mapping[str, Any]) -> Tokenizer:
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    n = len(tokens)
    scores: list[float] = md.get("tokenizer.ggml.scores") or [0.0] * n
    types: list[int] | None = md.get("tokenizer.ggml.token_type")
    if len(scores) != n or (types is not None and len(types) != n):
        raise ModelFormatError("GGUF tokenizer arrays (tokens/scores/token_type) have different lengths")
    vocab = _vocab(tokens)
    unk_id = md.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < n else None
    tok = Tokenizer(
        BPE(vocab, spm_merges(tokens, scores, types), unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
    steps: list[Any] = [normalizers.Replace(" ", "\u2581")]
    if prefix:
        steps.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    dec: list[Any] = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok


def _add_listed_tokens(tok: Tokenizer, md: Mapping[str, Any]) -> None:
    """Register control/unknown tokens as special and user-defined ones as plain added tokens, so all are
    matched whole in raw text (e.g. "<|im_start|>" -> one id) before normalization/BPE."""
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    types = md.get("tokenizer.ggml.token_type")
    if not types:
        return
    # UNKNOWN (<unk>) is special too: llama.cpp matches it whole and HF skips it when decoding.
    special = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i, t in enumerate(types)
        if t in (CONTROL, UNKNOWN)
    ]
    user = [
        AddedToken(tokens[i], special=False, normalized=False)
        for i, t in enumerate(types)
        if t == USER_DEFINED
    ]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)


_BUILDERS = {"gpt2": _build_gpt2, "llama": _build_llama}


def build_tokenizer(md: Mapping[str, Any], cache_path: Path | None = None) -> Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to the GGUF vocabulary; no BOS/EOS post-processing.

    With `cache_path`, a previously saved tokenizer is loaded from there, or the built one is saved
    there (atomically). The caller must make the path unique to the vocabulary (e.g. a content hash).
    """
    model = md.get("tokenizer.ggml.model")
    if model is None:
        raise ModelFormatError("this GGUF file carries no tokenizer (tokenizer.ggml.model is missing)")
    builder = _BUILDERS.get(str(model))
    if builder is None:
        raise ModelFormatError(
            f"unsupported GGUF tokenizer model {model!r}; supported: {', '.join(SUPPORTED_MODELS)}"
        )
    if "tokenizer.ggml.tokens" not in md:
        raise ModelFormatError("GGUF file has no tokenizer.ggml.tokens; it carries no vocabulary")
    if cache_path is not None and cache_path.is_file():
        try:
            return Tokenizer.from_file(str(cache_path))
        except Exception:  # corrupt/incompatible cache: rebuild and overwrite it
            pass
    tok = builder(md)
    _add_listed_tokens(tok, md)
    if cache_path is not None:
        _save_atomic(tok, cache_path)
    return tok


def _save_atomic(tok: Tokenizer, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            tok.save(tmp, pretty=False)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache holds nothing secret
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:  # a cache we cannot write only costs speed
        warnings.warn(f"could not write tokenizer cache {path}: {e}", stacklevel=3)
