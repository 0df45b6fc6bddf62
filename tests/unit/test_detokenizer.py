"""IncrementalDetokenizer on real vocabularies: split UTF-8 characters, SentencePiece spaces, stop strings."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from ember.engine.detokenizer import IncrementalDetokenizer
from ember.tokenizer import Tokenizer
from ember.weights.gguf_header import read_gguf_metadata

# Chinese, emoji with a skin-tone modifier, a ZWJ sequence and rare characters that byte-fallback splits.
UNICODE_TEXT = "你好，世界！🎉👍🏽 café 🧑‍🚀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 䨻 𓀀 done"


class Adapter:
    """encode/decode over ember's Tokenizer or a bare `tokenizers` one; records the longest decode."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.longest = 0

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        self.longest = max(self.longest, len(ids))
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)  # tokenizers

    def encode(self, text: str) -> list[int]:
        if isinstance(self.tok, Tokenizer):
            return self.tok.encode(text, add_special_tokens=False)
        return self.tok.encode(text, add_special_tokens=False).ids


def _ember_tokenizer(path) -> Tokenizer:
    from ember.hub import ember_home

    return Tokenizer.from_gguf_metadata(read_gguf_metadata(path), cache_dir=ember_home() / "tokenizers")


@pytest.fixture(scope="module")
def smol(smollm_gguf) -> Adapter:
    """SmolLM2's byte-level BPE vocabulary."""
    return Adapter(_ember_tokenizer(smollm_gguf))


@pytest.fixture(scope="module")
def gemma(gemma_gguf) -> Adapter:
    """Gemma 3 SentencePiece vocab with byte fallback."""
    return Adapter(_ember_tokenizer(gemma_gguf))


@pytest.fixture(scope="module")
def gemma_llama_style(gemma: Adapter) -> Adapter:
    """The same vocab with Llama / Mistral's decoder, which strips the leading space of a decode."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import decoders

    tok = BackendTokenizer.from_str(gemma.tok.backend.to_str())
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return Adapter(tok)


def feed(detok: IncrementalDetokenizer, ids: Sequence[int]) -> list[str]:
    """Add ids one at a time, checking after each that the deltas so far spell `.text`."""
    deltas: list[str] = []
    for t in ids:
        deltas.append(detok.add(t))
        assert "".join(deltas) == detok.text
    return deltas


def continuation(tok: Adapter, prompt: str, output: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt and of output as the model would produce them after the prompt."""
    prompt_ids, full = tok.encode(prompt), tok.encode(prompt + output)
    assert full[: len(prompt_ids)] == prompt_ids, "prompt/output boundary is not a token boundary"
    return prompt_ids, full[len(prompt_ids) :]


# ---- UTF-8 -------------------------------------------------------------------------------------
def _check_unicode(tok: Adapter) -> None:
    prompt, out = continuation(tok, "Say hello in many ways:", " " + UNICODE_TEXT)
    assert any("\ufffd" in tok.decode([t], skip_special_tokens=True) for t in out), "nothing is split"
    detok = IncrementalDetokenizer(tok, prompt, stop=[])
    deltas = feed(detok, out)
    deltas.append(detok.finish())
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == detok.text == " " + UNICODE_TEXT


def test_split_characters_are_held_until_complete_byte_level(smol):
    _check_unicode(smol)


def test_split_characters_are_held_until_complete_byte_fallback(gemma):
    _check_unicode(gemma)


def test_incomplete_character_at_finish_is_emitted_as_is(smol):
    first_byte_of_ni = smol.encode("你")[0]
    assert smol.decode([first_byte_of_ni], skip_special_tokens=True) == "\ufffd"
    detok = IncrementalDetokenizer(smol, smol.encode("Hi"), stop=[])
    deltas = feed(detok, [*smol.encode(" ok"), first_byte_of_ni])
    assert deltas[-1] == "" and detok.text == " ok"
    assert detok.finish() == "\ufffd"
    assert detok.text == " ok\ufffd" and not detok.stopped


# ---- SentencePiece spaces ----------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["gemma", "gemma_llama_style"])
def test_sentencepiece_spaces(fixture, request):
    tok: Adapter = request.getfixturevalue(fixture)
    output = " Hello world, how are you"
    prompt, out = continuation(tok, "Question: greet me.\nAnswer:", output)
    if fixture == "gemma_llama_style":  # token-by-token decoding really does lose the spaces here
        assert "".join(tok.decode([t], skip_special_tokens=True) for t in out) == "Helloworld,howareyou"
    detok = IncrementalDetokenizer(tok, prompt, stop=[])
    deltas = feed(detok, out)
    assert deltas[:2] == [" Hello", " world"]
    assert "".join(deltas) + detok.finish() == detok.text == output


# ---- stop strings ------------------------------------------------------------------------------
def _run_stop(tok: Adapter, text: str, stop: list[str]) -> tuple[IncrementalDetokenizer, list[str]]:
    prompt, out = continuation(tok, "User: hi\nAssistant:", text)
    detok = IncrementalDetokenizer(tok, prompt, stop=stop)
    deltas = []
    for t in out:
        deltas.append(detok.add(t))
        assert "".join(deltas) == detok.text
        if detok.stopped:
            break
    return detok, deltas


def test_stop_string_spanning_tokens(smol):
    detok, deltas = _run_stop(smol, " The answer is 42.\nUser: what", ["\nUser:"])
    assert detok.stopped and detok.stop_reason == "\nUser:"
    assert detok.text == " The answer is 42."
    assert "".join(deltas) + detok.finish() == detok.text  # finish after a stop adds nothing
    assert detok.add(smol.encode(" more")[0]) == "" and detok.text == " The answer is 42."


def test_stop_string_starting_mid_token(smol):
    assert " answer" in [smol.decode([t], skip_special_tokens=True) for t in smol.encode(" The answer is")]
    detok, _ = _run_stop(smol, " The answer is 42.", ["swer"])
    assert detok.stop_reason == "swer" and detok.text == " The an"


def test_stop_string_across_split_characters(smol):
    detok, deltas = _run_stop(smol, " 你好，世界！", ["世界"])
    assert detok.text == " 你好，" and detok.stop_reason == "世界"
    assert not any("\ufffd" in d for d in deltas)


def test_false_stop_prefix_is_released(smol):
    text = " Line one\nUsers are great\nUser: hi"
    prompt, out = continuation(smol, "User: hi\nAssistant:", text)
    detok = IncrementalDetokenizer(smol, prompt, stop=["\nUser:"])
    for t in out:
        detok.add(t)
        if smol.decode([t], skip_special_tokens=True) == "\n":
            assert not detok.text.endswith("\n")  # could begin "\nUser:": held back
        if detok.stopped:
            break
    assert detok.text == " Line one\nUsers are great"


def test_held_prefix_is_flushed_by_finish(smol):
    detok, deltas = _run_stop(smol, " Hello\nUs", ["\nUser:"])
    assert not detok.stopped and detok.text == " Hello"
    assert detok.finish() == "\nUs"
    assert detok.text == " Hello\nUs" and detok.stop_reason is None


@pytest.mark.parametrize("stop", [["great", "\nUser:", "one\n"], ["one\n", "\nUser:", "great"]])
def test_several_stop_strings_earliest_wins(smol, stop):
    detok, deltas = _run_stop(smol, " Line one\nUsers are great\nUser: hi", stop)
    assert detok.stop_reason == "one\n" and detok.text == " Line "
    assert "".join(deltas) == detok.text


def test_stop_strings_never_leak(smol):
    text = " alpha ### beta END gamma"
    prompt, out = continuation(smol, "Go:", text)
    for stop, want in [(["###"], " alpha "), (["END", "zzz"], " alpha ### beta "), (["nope"], text)]:
        detok, shown = IncrementalDetokenizer(smol, prompt, stop=stop), ""
        for t in out:
            shown += detok.add(t)
            assert want.startswith(shown)  # never shows a character that is not in the final text
            if detok.stopped:
                break
        assert shown + detok.finish() == detok.text == want


# ---- special tokens and cost -------------------------------------------------------------------
@pytest.mark.parametrize(("skip", "want"), [(True, " Hi."), (False, " Hi.<|im_end|>")])
def test_skip_special_tokens(smol, skip, want):
    eos = smol.encode("<|im_end|>")
    assert len(eos) == 1
    detok = IncrementalDetokenizer(smol, smol.encode("Say hi:"), stop=[], skip_special_tokens=skip)
    deltas = feed(detok, smol.encode(" Hi.") + eos)
    assert "".join(deltas) + detok.finish() == detok.text == want


def test_decode_window_stays_short(smol):
    text = " The quick brown fox jumps over the lazy dog. 你好，世界！🎉" * 30
    prompt, out = continuation(smol, "Story:", text)
    eos = smol.encode("<|im_end|>")
    detok = IncrementalDetokenizer(smol, prompt, stop=["never appears"])
    smol.longest = 0
    deltas = feed(detok, out + eos * 200)  # a long run of skipped specials must not grow the window
    deltas.append(detok.finish())
    assert len(out) > 400 and smol.longest <= 40
    assert "".join(deltas) == detok.text == text
