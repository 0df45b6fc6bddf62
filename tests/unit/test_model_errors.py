"""Bad model files and templates: each gets a clear error that says what is supported."""

from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType

import ember
from ember import SamplingParams
from ember.errors import ModelFormatError, ModelNotFoundError, TemplateError
from tests.models.tiny_gguf import write_tiny_gguf


def test_unsupported_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "bloom.gguf", arch="bloom")
    with pytest.raises(ModelFormatError, match=r"architecture 'bloom' is not supported.*llama"):
        ember.load(path)


def test_unsupported_tensor_type(tmp_path):
    path = write_tiny_gguf(tmp_path / "iq.gguf", odd_kind=GGMLQuantizationType.IQ4_NL)
    with pytest.raises(ModelFormatError, match=r"IQ4_NL.*supported: .*Q4_0"):
        ember.load(path)


def test_not_gguf_and_empty(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"")
    with pytest.raises(ModelFormatError):
        ember.load(tmp_path / "x.gguf")
    (tmp_path / "y.gguf").write_text("hello, not a model")
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        ember.load(tmp_path / "y.gguf")


def test_truncated_tensor_data(tmp_path):
    path = write_tiny_gguf(tmp_path / "t.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelFormatError, match="truncated"):
        ember.load(path)


def test_unknown_model_and_missing_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        ember.load("smollm2-13m")
    with pytest.raises(ModelNotFoundError, match="no such file"):
        ember.load(tmp_path / "nope.gguf")


def test_missing_template_and_builtin_fallbacks(tmp_path):
    llm = ember.load(write_tiny_gguf(tmp_path / "base.gguf"), dtype="float32")
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(TemplateError, match="no chat template.*chatml"):
        llm.chat(msgs, SamplingParams(max_tokens=2))
    plain = ember.load(tmp_path / "base.gguf", chat_template="plain")
    assert plain.tokenizer.decode(plain.encode_chat(msgs)) == "User: hi\n\nAssistant:"
    chatml = ember.load(tmp_path / "base.gguf", chat_template="chatml")
    ids = chatml.encode_chat(msgs)
    assert chatml.tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ids[0] == chatml.tokenizer.backend.token_to_id("<|im_start|>")  # matched as one special token
    out = chatml.chat(msgs, SamplingParams(temperature=0, max_tokens=3))
    assert out.usage.prompt_tokens == len(ids)


def test_template_file_and_template_errors(tmp_path):
    alternate = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                 "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
                 "{% endif %}{{ m['content'] }}{% endfor %}")
    f = tmp_path / "t.jinja"
    f.write_text(alternate)
    llm = ember.load(write_tiny_gguf(tmp_path / "m.gguf"), chat_template=f, dtype="float32")
    with pytest.raises(TemplateError, match="roles must alternate"):
        llm.chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(TemplateError, match="does not exist"):
        ember.load(tmp_path / "m.gguf", chat_template=tmp_path / "missing.jinja")
    broken = ember.load(tmp_path / "m.gguf", chat_template="{% for m in messages %}{{ m['content'] }")
    with pytest.raises(TemplateError, match="syntax error"):
        broken.chat([{"role": "user", "content": "a"}])
