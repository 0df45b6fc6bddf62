"""Tokenizers built from GGUF metadata vs transformers' GGUF tokenizers, plus the chat template.

Oracles: SmolLM2 uses `AutoTokenizer.from_pretrained(dir, gguf_file=...)` as is. For Gemma the full
AutoTokenizer load takes ~35 s (its config path parses the file with gguf.GGUFReader), so the fast
tests use the very converter AutoTokenizer calls (`get_gguf_tokenizer` + `convert_gguf_tokenizer`);
that backend has no BOS post-processor, so ids are compared with add_special_tokens=False and the
BOS rule is checked separately. The full AutoTokenizer comparison for Gemma is marked slow.
"""

from __future__ import annotations

import datetime
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from ember.errors import ModelFormatError, ParameterError, TemplateError
from ember.tokenizer import Tokenizer
from ember.weights.gguf_tokenizer import build_tokenizer, read_gguf_metadata, spm_merges

TEXTS = [
    "Hello world",
    "Hello, world! How are you today?",
    "12345 3.14159",
    "1,000,000 and 2024-01-02; x1 a12 3",
    "def f(x):\n    return x**2  # square\n\tpass\n",
    "你好，世界",
    "Emoji: 🤗🚀👍🏽 ok",
    "  leading spaces",
    "trailing spaces   ",
    "multiple   spaces  here",
    "\n\nnewlines\n\n\nand\ttabs\t\t",
    "<|im_start|>user\nHi<|im_end|>",
    "<|im_start|>assistant\n",
    "ÀÉÎõü ß æ œ café naïve",
    "don't won't it's I'm we'll they've",
    "",
    " ",
    "\n",
    "http://example.com/path?q=1&b=2",
    "𝔹𝕠𝕝𝕕 text ﬁ \u200b zero width",
    "<table><tr><td>x</td></tr></table>",
    "<start_of_turn>user\nhi<end_of_turn>\n",
]


@pytest.fixture(scope="module")
def smol_md(smollm_gguf: Path) -> dict[str, Any]:
    return read_gguf_metadata(smollm_gguf)


@pytest.fixture(scope="module")
def gemma_md(gemma_gguf: Path) -> dict[str, Any]:
    return read_gguf_metadata(gemma_gguf)


@pytest.fixture(scope="module")
def smol(smol_md: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smol_md)


@pytest.fixture(scope="module")
def gemma_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tokcache")


@pytest.fixture(scope="module")
def gemma(gemma_md: dict[str, Any], gemma_cache: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gemma_md, cache_dir=gemma_cache)  # cold build, saved to the cache


@pytest.fixture(scope="module")
def smol_ref(smollm_gguf: Path) -> Any:
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(str(smollm_gguf.parent), gguf_file=smollm_gguf.name)


@pytest.fixture(scope="module")
def gemma_ref_backend(gemma_gguf: Path) -> Any:
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, tok_dict, _ = get_gguf_tokenizer(str(gemma_gguf))
    backend, _ = convert_gguf_tokenizer(arch, tok_dict)
    return backend


# ---- metadata reader ------------------------------------------------------------------------------
def test_reader_matches_gguf_py(smollm_gguf: Path, smol_md: dict[str, Any]) -> None:
    import gguf

    reader = gguf.GGUFReader(str(smollm_gguf))
    ref = {k: f.contents() for k, f in reader.fields.items()}
    assert smol_md.keys() == ref.keys()
    for k, v in ref.items():
        assert smol_md[k] == v and type(smol_md[k]) is type(v), k


def test_reader_all_value_types_both_endians(tmp_path: Path) -> None:
    import gguf

    for endian in (gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG):
        path = tmp_path / f"t{endian.name}.gguf"
        w = gguf.GGUFWriter(str(path), "llama", endianess=endian)
        w.add_uint8("t.u8", 200)
        w.add_int8("t.i8", -5)
        w.add_uint16("t.u16", 60000)
        w.add_int32("t.i32", -123456)
        w.add_uint64("t.u64", 2**40)
        w.add_int64("t.i64", -(2**40))
        w.add_float32("t.f32", 0.5)
        w.add_float64("t.f64", 1e-300)
        w.add_bool("t.bool", True)
        w.add_string("t.str", "héllo ▁ 你好")
        w.add_array("t.ints", [1, 2, 3])
        w.add_array("t.floats", [0.25, -1.5])
        w.add_array("t.strs", ["a", "", "<0x0A>", "▁x"])
        w.add_array("t.nested", [[1, 2], [3]])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        md = read_gguf_metadata(path)
        ref = {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()}
        assert ref.pop("t.nested") == [1, 2, 3]  # gguf-py flattens nested arrays; we keep the nesting
        assert {k: v for k, v in md.items() if k != "t.nested"} == ref
        assert md["t.strs"] == ["a", "", "<0x0A>", "▁x"] and md["t.nested"] == [[1, 2], [3]]
        assert md["t.bool"] is True and md["t.i64"] == -(2**40)


def test_reader_rejects_bad_files(tmp_path: Path, smollm_gguf: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(ModelFormatError, match="not a GGUF"):
        read_gguf_metadata(bad)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm_gguf.read_bytes()[:100_000])  # ends inside the vocabulary
    with pytest.raises(ModelFormatError, match="truncated"):
        read_gguf_metadata(cut)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelFormatError):
        read_gguf_metadata(empty)


# ---- SmolLM2 (gpt2 byte-level BPE, pre='smollm') -----------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_smollm_encode_matches_transformers(smol: Tokenizer, smol_ref: Any, text: str) -> None:
    assert smol.encode(text) == smol_ref.encode(text)
    assert smol.encode(text, add_special_tokens=False) == smol_ref.encode(text, add_special_tokens=False)
    assert smol.decode(smol.encode(text), skip_special_tokens=False) == text


def test_smollm_digits_follow_hf_tokenizer_json(smol: Tokenizer) -> None:
    # transformers' GGUF conversion drops SmolLM2's Digits(individual_digits=True) pre-tokenizer; it
    # cannot show in ids (the vocabulary has no multi-digit or 'Ġ<digit>' tokens) but the split must
    # follow the HF tokenizer.json: every digit alone, the space before a number a token of its own.
    pieces = [p for p, _ in smol.backend.pre_tokenizer.pre_tokenize_str("x12 345")]
    assert pieces == ["x", "1", "2", "Ġ", "3", "4", "5"]


def test_smollm_special_tokens(smol: Tokenizer, smol_ref: Any) -> None:
    im_end = smol.backend.token_to_id("<|im_end|>")
    assert im_end in smol.eos_token_ids and 2 in smol.eos_token_ids and smol.eos_token_id == 2
    assert smol.add_bos is False and smol.bos_token == "<|im_start|>" and smol.eos_token == "<|im_end|>"
    assert smol.vocab_size == 49152 == len(smol_ref)
    assert smol.special_ids == frozenset(range(17))
    ids = smol.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == im_end
    assert smol.decode(ids) == "user\nHi"
    assert smol.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>"
    assert smol.id_to_token(im_end) == "<|im_end|>"
    with pytest.raises(ParameterError):
        smol.id_to_token(10**7)


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi 你好"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ],
]


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_smollm_chat_template_matches_transformers(
    smol: Tokenizer, smol_ref: Any, conv: list, gen: bool
) -> None:
    text = smol.apply_chat_template(conv, add_generation_prompt=gen)
    assert text == smol_ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    assert text.startswith("<|im_start|>system\n") and ("<|im_start|>assistant\n" in text) == (
        gen or len(conv) > 1
    )
    assert smol.encode_chat(conv, add_generation_prompt=gen) == smol_ref.encode(
        text, add_special_tokens=False
    )


# ---- Gemma 3 (SentencePiece BPE, byte fallback, no template) -------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_gemma_encode_matches_transformers(gemma: Tokenizer, gemma_ref_backend: Any, text: str) -> None:
    ids = gemma.encode(text, add_special_tokens=False)
    ref = gemma_ref_backend.encode(text, add_special_tokens=False).ids
    assert ids == ref
    assert gemma.encode(text) == [2, *ref]
    assert gemma.decode(ids, skip_special_tokens=False) == gemma_ref_backend.decode(
        ref, skip_special_tokens=False
    )
    assert gemma.decode(ids, skip_special_tokens=False) == text


def test_gemma_byte_fallback_and_bos(gemma: Tokenizer) -> None:
    text = "\x00\U000f0000"  # characters with no piece of their own: UTF-8 byte tokens
    ids = gemma.encode(text, add_special_tokens=False)
    assert [gemma.id_to_token(i) for i in ids] == ["<0x00>", "<0xF3>", "<0xB0>", "<0x80>", "<0x80>"]
    assert gemma.decode(ids) == text
    assert gemma.add_bos and gemma.bos_token == "<bos>"
    assert gemma.encode("<bos>Hi") == [2, *gemma.encode("Hi", add_special_tokens=False)]  # no double BOS
    assert gemma.encode("Hi")[0] == 2 and gemma.encode("") == [2]
    assert {1, 106} <= gemma.eos_token_ids  # <eos>, <end_of_turn>
    assert gemma.vocab_size == 262144


def test_gemma_no_template_is_clear(gemma: Tokenizer) -> None:
    with pytest.raises(TemplateError, match="no chat template") as e:
        gemma.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "chat_template=" in str(e.value) and "--chat-template" in str(e.value)


GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_no_double_bos_when_template_writes_it(gemma: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    ids = gemma.encode_chat(msgs, chat_template=GEMMA_TEMPLATE)
    assert ids[0] == 2 and ids[1] != 2 and ids.count(2) == 1
    assert ids[1] == 105 and 106 in ids  # <start_of_turn>, <end_of_turn> as single ids
    # A template that does not write BOS still gets the one this model asks for.
    plain = gemma.encode_chat(msgs, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert plain == [2, *gemma.encode("Hi", add_special_tokens=False)]


def test_gemma_cache_roundtrip(gemma_md: dict[str, Any], gemma: Tokenizer, gemma_cache: Path) -> None:
    files = list(gemma_cache.glob("*.json"))
    assert len(files) == 1 and not list(gemma_cache.glob("*.tmp"))
    t = time.perf_counter()
    cached = Tokenizer.from_gguf_metadata(gemma_md, cache_dir=gemma_cache)
    elapsed = time.perf_counter() - t
    for text in TEXTS:
        assert cached.encode(text) == gemma.encode(text)
    assert cached.special_ids == gemma.special_ids and cached.eos_token_ids == gemma.eos_token_ids
    assert elapsed < 30


def test_corrupt_cache_is_rebuilt(smol_md: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "tok.json"
    path.write_text("{not json")
    tok = build_tokenizer(smol_md, path)
    assert tok.encode("Hello world").ids == [19556, 905]
    assert build_tokenizer(smol_md, path).encode("Hello world").ids == [19556, 905]  # now a valid cache


@pytest.mark.slow
def test_gemma_full_autotokenizer(gemma: Tokenizer, gemma_gguf: Path) -> None:
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoTokenizer.from_pretrained(str(gemma_gguf.parent), gguf_file=gemma_gguf.name)
    for text in TEXTS:
        assert gemma.encode(text) == ref.encode(text)
        assert gemma.decode(gemma.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True)


@pytest.mark.slow
def test_gemma_reader_matches_gguf_py(gemma_gguf: Path, gemma_md: dict[str, Any]) -> None:
    import gguf

    ref = {k: f.contents() for k, f in gguf.GGUFReader(str(gemma_gguf)).fields.items()}
    assert gemma_md == ref


# ---- construction details -------------------------------------------------------------------------
def test_spm_merges_rank_by_score() -> None:
    tokens = ["<unk>", "a", "b", "c", "ab", "bc", "abc", "<0x41>"]
    scores = [0.0, -1.0, -1.0, -1.0, -3.0, -2.0, -4.0, 0.0]
    types = [2, 1, 1, 1, 1, 1, 1, 6]
    assert spm_merges(tokens, scores, types) == [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]


def test_unsupported_model_and_unknown_pre(smol_md: dict[str, Any]) -> None:
    with pytest.raises(ModelFormatError, match="'bert'.*gpt2, llama"):
        build_tokenizer({**smol_md, "tokenizer.ggml.model": "bert"})
    with pytest.warns(UserWarning, match="mystery-pre"):
        tok = build_tokenizer({**smol_md, "tokenizer.ggml.pre": "mystery-pre"})
    assert tok.encode("Hello world").ids == [19556, 905]


@pytest.mark.parametrize(
    ("pre", "expected"),
    [
        ("gpt2", ["x", "12", "Ġ3456"]),
        ("llama-bpe", ["x", "12", "Ġ", "345", "6"]),
        ("qwen2", ["x", "1", "2", "Ġ", "3", "4", "5", "6"]),
    ],
)
def test_pre_tokenizer_schemes(smol_md: dict[str, Any], pre: str, expected: list[str]) -> None:
    tok = build_tokenizer({**smol_md, "tokenizer.ggml.pre": pre})
    assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("x12 3456")][: len(expected)] == expected


# ---- chat template behaviour ----------------------------------------------------------------------
MSG = [{"role": "user", "content": "héllo 你好"}]


def test_template_helpers(smol: Tokenizer) -> None:
    t = "{{ messages[0]['content'] | tojson }}|{{ strftime_now('%Y') }}|{{ foo }}|{{ eos_token }}"
    out = smol.apply_chat_template(MSG, chat_template=t, foo="bar")
    assert out == f'"héllo 你好"|{datetime.datetime.now().year}|bar|<|im_end|>'
    loop = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}"
    assert smol.apply_chat_template(MSG * 3, chat_template=loop) == "user"
    gen = "{% generation %}{{ add_generation_prompt }}{% endgeneration %}"
    assert smol.apply_chat_template(MSG, chat_template=gen, add_generation_prompt=False) == "False"


def test_template_errors(smol: Tokenizer) -> None:
    with pytest.raises(TemplateError, match="Conversation roles must alternate"):
        smol.apply_chat_template(
            MSG, chat_template="{{ raise_exception('Conversation roles must alternate') }}"
        )
    with pytest.raises(TemplateError, match="syntax error"):
        smol.apply_chat_template(MSG, chat_template="{% for m in messages %}{{ m }")
    with pytest.raises(TemplateError, match="undefined"):
        smol.apply_chat_template(MSG, chat_template="{{ nothing.here }}")
    with pytest.raises(TemplateError):  # sandboxed: no mutation of the caller's messages
        smol.apply_chat_template(MSG, chat_template="{% set _ = messages.append(1) %}")
    assert MSG == [{"role": "user", "content": "héllo 你好"}]


@pytest.mark.parametrize(
    "bad",
    [
        "hi",
        [("user", "hi")],
        [{"content": "hi"}],
        [{"role": "user", "content": 3}],
        [{"role": None, "content": "hi"}],
    ],
)
def test_message_validation(smol: Tokenizer, bad: Any) -> None:
    with pytest.raises(ParameterError, match="messages|role|content"):
        smol.apply_chat_template(bad)
