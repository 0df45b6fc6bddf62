"""`ember.eval`: perplexity on a hand-computable model (windowed = single window), the pi check's
counting, and `ember eval ppl` / `ember eval pi` as a user runs them."""

from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ember.errors import ParameterError
from ember.eval import PI, PiResult, perplexity, pi_check

V = 11


class BigramLM:
    """A stand-in for LLM whose next-token logits depend only on the current token: any window
    scores a token the same, so every windowing must give the single-window result."""

    def __init__(self, context: int = 64, seed: int = 0) -> None:
        self.table = torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * 2  # [V, V]
        self.engine = SimpleNamespace(max_model_len=context, kv=SimpleNamespace(capacity_tokens=context))
        self.calls: list[int] = []

    def encode(self, text):
        return [ord(c) % V for c in text] if isinstance(text, str) else list(text)

    def logits(self, ids):
        assert 0 < len(ids) <= self.engine.max_model_len
        self.calls.append(len(ids))
        return self.table[torch.tensor(ids)]  # [S, V]


def _by_hand(lm: BigramLM, ids: list[int]) -> float:
    logp = torch.log_softmax(lm.table.double(), -1)
    return math.exp(-sum(float(logp[a, b]) for a, b in zip(ids, ids[1:], strict=False)) / (len(ids) - 1))


def _ids(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_uniform_model_has_perplexity_vocab():
    lm = BigramLM()
    lm.table.zero_()
    ppl, n = perplexity(lm, _ids(30))
    assert n == 29 and ppl == pytest.approx(V, rel=1e-6)


@pytest.mark.parametrize("window, stride", [(None, None), (64, None), (8, 3), (8, 7), (2, 1), (17, 16)])
def test_windowed_equals_single_window(window, stride):
    lm = BigramLM()
    ids = _ids(50)
    single, n = perplexity(lm, ids, window=64)
    assert lm.calls == [50] and n == 49
    assert single == pytest.approx(_by_hand(lm, ids), rel=1e-6)
    got, n2 = perplexity(lm, ids, window=window, stride=stride)
    assert n2 == 49 and got == pytest.approx(single, rel=1e-6)


def test_text_longer_than_the_context():
    lm = BigramLM(context=32)
    ids = _ids(200)
    ppl, n = perplexity(lm, ids)  # default: window = context (32), stride 16
    assert n == 199 and ppl == pytest.approx(_by_hand(lm, ids), rel=1e-6)
    assert max(lm.calls) == 32 and len(lm.calls) == 1 + math.ceil((200 - 32) / 16)


def test_string_text_is_encoded():
    lm = BigramLM()
    assert perplexity(lm, "hello world")[0] == pytest.approx(_by_hand(lm, lm.encode("hello world")), rel=1e-6)


@pytest.mark.parametrize("text, kwargs, match", [
    ("", {}, "at least 2"),
    ("a", {}, "at least 2"),
    ("hello", dict(window=65), "window"),
    ("hello", dict(window=1), "window"),
    ("hello", dict(window=8, stride=8), "stride"),
    ("hello", dict(window=8, stride=0), "stride"),
])
def test_bad_inputs(text, kwargs, match):
    with pytest.raises(ParameterError, match=match):
        perplexity(BigramLM(), text, **kwargs)


def test_pi_check_counts_prompt_plus_continuation():
    class Fake:
        def generate(self, prompts, params):
            assert prompts == ["3.14159"] * 3 and [p.seed for p in params] == [7, 8, 9]
            assert {(p.temperature, p.top_p, p.max_tokens) for p in params} == {(0.7, 0.9, 20)}
            texts = ["2653589793238", "26535", "2653589793 and more"]
            return [SimpleNamespace(text=t) for t in texts]

    res = pi_check(Fake(), n=3, seed=7)
    assert res.hits == 2 and str(res) == f"2/3 start with {PI}" and res.texts[1] == "3.1415926535"
    assert PiResult(["3.141592653589793"]).hits == 1


# ---- the CLI, as a user runs it ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from tests.models.tiny_gguf import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("eval") / "tiny.gguf")


def _ember(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ember", "eval", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_eval_ppl(tiny_gguf, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the cat in the hat sat on the mat, and then the dog ran in the park. " * 8)
    r = _ember("ppl", str(tiny_gguf), str(text), "--quantize", "int8", "--window", "64")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("perplexity ") and " tokens in " in r.stdout and "quantize=int8" in r.stderr
    r = _ember("ppl", str(tiny_gguf), str(tmp_path / "missing.txt"))
    assert r.returncode == 1 and "no such file" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "empty.txt").write_text("  \n")
    r = _ember("ppl", str(tiny_gguf), str(tmp_path / "empty.txt"))
    assert r.returncode == 1 and "empty" in r.stderr and "Traceback" not in r.stderr
    r = _ember("ppl", str(tiny_gguf), str(text), "--window", "100000")
    assert r.returncode == 1 and "window" in r.stderr and "Traceback" not in r.stderr


def test_cli_eval_pi(tiny_gguf):
    r = _ember("pi", str(tiny_gguf), "-n", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("1: '3.14159") and lines[-1].endswith(f"/2 start with {PI}")
