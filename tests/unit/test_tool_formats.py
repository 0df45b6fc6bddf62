"""Tool-call formats: parsing canned replies (whole and streamed at every split), detection from chat
templates, prepared messages, and grammars checked token by token with a real llguidance matcher."""

from __future__ import annotations

import json
from typing import Any

import llguidance
import pytest
import tokenizers
from pydantic import BaseModel

from ember.errors import TemplateError
from ember.structured.formats import FORMATS, ToolParser, detect_format, get_format
from ember.structured.formats.mistral import short_id
from ember.structured.formats.scanner import JsonScanner
from ember.structured.tools import ToolCall, normalize_tools
from ember.tokenizer import Tokenizer

TOOLS = normalize_tools([
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather // not a comment # {x}",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "a city, e.g. São Paulo // # }"},
            "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search", "parameters": {"type": "object", "properties": {
            "query": {"type": "string"}, "limit": {"type": "integer"}}, "required": ["query", "limit"]}}},
])
W = '{"city": "Paris"}'
S = '{"query": "x", "limit": 3}'
R = '{"city": "Rome"}'
U = '{"city": "São Paulo \\"centro\\"\\n\\\\ 東京"}'  # unicode and escapes, as generated


# ---- helpers ----------------------------------------------------------------------------------------
def run(parser: ToolParser, chunks: list[str]) -> dict[str, Any]:
    """Content, calls and the streamed deltas put back together."""
    content, streamed = "", {}
    for d in [parser.feed(c) for c in chunks] + [parser.close()]:
        content += d.content
        for t in d.tool_calls:
            if t.index not in streamed:
                assert t.id is not None and t.name is not None, "a call's first delta carries id and name"
                streamed[t.index] = [t.id, t.name, ""]
            else:
                assert t.id is None and t.name is None
            streamed[t.index][2] += t.arguments
    calls = [(c.name, c.arguments) for c in parser.calls]
    for c in parser.calls:  # every complete call was streamed whole
        assert [c.id, c.name, c.arguments] in streamed.values()
    return {"content": content, "calls": calls, "incomplete": parser.incomplete,
            "streamed": sorted((n, a) for _, n, a in streamed.values())}


def check(fmt: str, text: str, content: str, calls: list[tuple[str, str]], incomplete: bool = False) -> None:
    """The whole reply parses as expected, and so does every split of it."""
    f = get_format(fmt)
    whole = run(f.parser(TOOLS), [text])
    assert (whole["content"], whole["calls"], whole["incomplete"]) == (content, calls, incomplete)
    for _, args in calls:
        json.loads(args)
    if not incomplete:
        assert whole["streamed"] == sorted(calls)
    assert run(f.parser(TOOLS), list(text)) == whole, "fed character by character"
    for i in range(1, len(text)):
        assert run(f.parser(TOOLS), [text[:i], text[i:]]) == whole, f"split at {i}: {text[:i]!r}"


def hermes(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


def mcall(name: str, args: str, key: str = "arguments") -> str:
    return f'{{"name": "{name}", "{key}": {args}}}'


# ---- the JSON scanner -------------------------------------------------------------------------------
@pytest.mark.parametrize(("doc", "error"), [
    ("{}", None), ("[]", None), ('{"a": [1, -2.5e+3, 0, 0.5E-2, 1e5, true, false, null, "\\u00e9"]} ', None),
    ('{"k": {"n": [[], {}], "": ""}}', None), ('"just a string"', None), ('{"a": "\\ud83d"}', None),
    ('{"a":1,}', 7), ("[1 2]", 3), ('{"a" 1}', 5), ('{"a": 01}', 7), ('{"a": 1.}', 8), ('{"a": -}', 7),
    ('{"a": 1.e5}', 8), ('{"a": "\x01"}', 7), ('{"a": "\\x"}', 8), ('{"a": "\\u12g4"}', 11),
    ('{"a": tru}', 9), ('{"a": nul}', 9), ("[1,]", 3), ('{"a": [}', 7), ("{1: 2}", 1), ("{'a': 1}", 1),
    ('{"a": 2}}', None),  # the value ends before the extra "}"; what follows is the caller's
    ('{"a": +1}', 6), ('{"a": .5}', 6), ('{"a": True}', 6), ("[", None), ('{"a": "open', None),
])
def test_scanner_validates_like_json(doc: str, error: int | None) -> None:
    for chunks in ([doc], list(doc)):
        sc, pos = JsonScanner(), 0
        text = ""
        for c in chunks:
            text += c
            pos = sc.feed(text, pos)
        assert sc.error == error, chunks
    if error is None and sc.done and not doc[pos:].strip():
        json.loads(doc)
    elif sc.done or error is not None:
        with pytest.raises(ValueError):
            json.loads(doc)


# ---- parsing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "content", "calls"), [
    (hermes("get_weather", W), "", [("get_weather", W)]),
    (hermes("get_weather", W) + "\n" + hermes("search", S) + "<|im_end|>", "",
     [("get_weather", W), ("search", S)]),
    ("Let me check.\n\n" + hermes("search", S), "Let me check.", [("search", S)]),
    ("Plain: a < b, {x: 1}, </tool_call>.<|im_end|>", "Plain: a < b, {x: 1}, </tool_call>.", []),
    ("Ends with a partial marker <tool_c", "Ends with a partial marker <tool_c", []),
    (hermes("get_weather", U), "", [("get_weather", U)]),
    ('<tool_call> {"arguments" : {"city": "Rome"} ,  "name":"get_weather"}  </tool_call>', "",
     [("get_weather", '{"city": "Rome"}')]),  # arguments before name, odd whitespace
    # arguments as a JSON string
    (hermes("search", json.dumps(S)), "", [("search", S)]),
    ('<tool_call>\n{"name": "search", "id": 7, "arguments": {}}\n</tool_call>', "", [("search", "{}")]),
    ('<tool_call>\n{"name": "search"}\n</tool_call>', "", [("search", "{}")]),
    # malformed after the trigger: the text is content, nothing lost
    ("<tool_call>\nI cannot call tools.</tool_call>", "<tool_call>\nI cannot call tools.</tool_call>", []),
    ('<tool_call>\n{"arguments": {}}\n</tool_call>', '<tool_call>\n{"arguments": {}}\n</tool_call>', []),
    ('<tool_call>\n{"name": 3}</tool_call>', '<tool_call>\n{"name": 3}</tool_call>', []),
    ("<tool_call><tool_call>\n" + mcall("search", S) + "\n</tool_call>", "<tool_call>", [("search", S)]),
    (hermes("search", S) + "\n\n and then }", "and then }", [("search", S)]),
    ("Check.\n" + hermes("search", S) + "\nDone.", "Check.\n\nDone.", [("search", S)]),
    ("  Indented answer.\n\n", "  Indented answer.\n\n", []),
    ("<tool_call>\n" + mcall("search", S) + " oops", "oops", [("search", S)]),  # no closing tag
    (f"<tool_call>\n[{mcall('search', S)}]</tool_call>", f"<tool_call>\n[{mcall('search', S)}]</tool_call>",
     []),  # not this format's syntax
])
def test_hermes_parse(text: str, content: str, calls: list[tuple[str, str]]) -> None:
    check("hermes", text, content, calls)


@pytest.mark.parametrize(("text", "content", "calls"), [
    (mcall("get_weather", W, "parameters"), "", [("get_weather", W)]),
    (mcall("get_weather", W, "parameters") + "; " + mcall("search", S, "parameters") + "<|eom_id|>", "",
     [("get_weather", W), ("search", S)]),
    ("<|python_tag|>" + mcall("search", S, "parameters") + "<|eom_id|>", "", [("search", S)]),
    ("Sure.<|python_tag|>" + mcall("search", S, "parameters"), "Sure.", [("search", S)]),
    ("Hello! {x} is not a call.<|eot_id|>", "Hello! {x} is not a call.", []),
    ("Done.<|eom_id|><|eot_id|>", "Done.", []),
    ("  \n" + mcall("get_weather", U, "parameters"), "", [("get_weather", U)]),
    ("{oops, not json}", "{oops, not json}", []),
    (mcall("search", S, "arguments"), "", [("search", S)]),  # "arguments" tolerated too
    (mcall("search", S, "parameters") + "; garbage", "; garbage", [("search", S)]),
])
def test_llama3_parse(text: str, content: str, calls: list[tuple[str, str]]) -> None:
    check("llama3", text, content, calls)


@pytest.mark.parametrize(("text", "content", "calls"), [
    ("[TOOL_CALLS][" + mcall("get_weather", W) + "]</s>", "", [("get_weather", W)]),
    ("[TOOL_CALLS] [" + mcall("get_weather", W) + ", " + mcall("search", S) + "]", "",
     [("get_weather", W), ("search", S)]),
    ("Checking.[TOOL_CALLS][" + mcall("search", S) + "]", "Checking.", [("search", S)]),
    ("[TOOL_CALLS]" + mcall("get_weather", U), "", [("get_weather", U)]),  # one object, no array
    ("A list: [1, 2] and {a}.</s>", "A list: [1, 2] and {a}.", []),
    ("[TOOL_CALLS] nothing", "[TOOL_CALLS] nothing", []),
    ("[TOOL_CALLS][" + mcall("search", S) + ", 5]", ", 5]", [("search", S)]),
])
def test_mistral_parse(text: str, content: str, calls: list[tuple[str, str]]) -> None:
    check("mistral", text, content, calls)


@pytest.mark.parametrize(("text", "content", "calls"), [
    ('{"content": "Hi \\"you\\"\\n\\u00e9 \\ud83d\\ude00 \\u2603 \\/"}<|im_end|>', 'Hi "you"\né 😀 ☃ /', []),
    ('{"tool_calls": [' + mcall("get_weather", W) + "]}", "", [("get_weather", W)]),
    ('{"tool_calls": [' + mcall("get_weather", U) + ", " + mcall("search", S) + "]}", "",
     [("get_weather", U), ("search", S)]),
    ("Plain text, no envelope {}", "Plain text, no envelope {}", []),
    ('{"answer": 42}', '{"answer": 42}', []),
    ('{"content": "lone \\ud83d surrogate"}', "lone \ufffd surrogate", []),
    ('{"content": "a"} trailing', "a trailing", []),
])
def test_generic_parse(text: str, content: str, calls: list[tuple[str, str]]) -> None:
    check("generic", text, content, calls)


@pytest.mark.parametrize(("fmt", "text"), [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa'),
    ("hermes", "<tool_call>\n"),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Pa'),
    ("mistral", '[TOOL_CALLS][{"name": "search", "arguments": {"query": "x", "li'),
    ("generic", '{"tool_calls": [{"name": "search", "arguments": {"query": "x'),
])
def test_cut_off_call_is_incomplete(fmt: str, text: str) -> None:
    check(fmt, text, "", [], incomplete=True)


def test_cut_after_complete_calls_is_not_incomplete() -> None:
    check("mistral", "[TOOL_CALLS][" + mcall("search", S), "", [("search", S)])
    check("hermes", hermes("search", S)[:-5], "", [("search", S)])  # closing tag cut
    check("generic", '{"content": "cut mid-sen', "cut mid-sen", [])


def test_malformed_inside_named_call_keeps_the_rest() -> None:
    # the name and a valid prefix of the arguments were streamed; the call is broken off, the rest is content
    check("hermes", '<tool_call>\n{"name": "search", "arguments": {"query": tru}}\n</tool_call> ok',
          "}}\n</tool_call> ok", [], incomplete=True)
    check("hermes", '<tool_call>\n{"name": "search", "arguments": {"limit": 01}}\n</tool_call>',
          "1}}\n</tool_call>", [], incomplete=True)


def test_stream_is_eager() -> None:
    """Content goes out once it cannot start a trigger; the name once complete; arguments as they come."""
    p = get_format("hermes").parser(TOOLS)
    assert p.feed("Hello wor").content == "Hello wor"
    assert p.feed("ld <").content == "ld"  # "<" may start <tool_call>, and " " may precede one
    assert p.feed("b> ").content == " <b>"
    d = p.feed('<tool_call>\n{"name": "get_weat')
    assert d.content == "" and d.tool_calls == []
    d = p.feed('her", "arguments": {"ci')
    assert [(t.index, t.name, t.arguments) for t in d.tool_calls] == [(0, "get_weather", '{"ci')]
    d = p.feed('ty": "Rome"')
    assert [(t.index, t.name, t.arguments) for t in d.tool_calls] == [(0, None, 'ty": "Rome"')]
    assert p.calls == []
    d = p.feed("}}\n</tool_call>")
    assert [t.arguments for t in d.tool_calls] == ["}"]
    assert [c.arguments for c in p.calls] == ['{"city": "Rome"}']
    g = get_format("generic").parser(TOOLS)
    assert g.feed('{"content": "Bonjour, ').content == "Bonjour, "
    assert g.feed("\\u00").content == ""  # a partial escape waits
    assert g.feed('e9t\\ud83d').content == "ét"  # a high surrogate waits for its pair
    assert g.feed('\\ude00"}').content == "😀"


def test_deltas_in_openai_shape() -> None:
    p = get_format("mistral").parser(TOOLS)
    d = p.feed("[TOOL_CALLS][" + mcall("search", S) + ", " + mcall("get_weather", W) + "]")
    shapes = [t.openai() for t in d.tool_calls]
    assert shapes[0]["index"] == 0 and shapes[0]["type"] == "function" and shapes[0]["id"].startswith("call_")
    assert shapes[0]["function"] == {"name": "search", "arguments": S}
    assert shapes[1]["index"] == 1 and shapes[1]["function"] == {"name": "get_weather", "arguments": W}
    assert [c.openai() for c in p.calls] == [{"id": s["id"], "type": "function", "function": s["function"]}
                                            for s in shapes]


def test_parse_helper() -> None:
    content, calls = get_format("hermes").parse("Hi " + hermes("search", S), TOOLS)
    assert content == "Hi" and [(c.name, c.parsed_arguments()) for c in calls] == [("search", json.loads(S))]


# ---- detection --------------------------------------------------------------------------------------
# Short excerpts with each family's markers (not whole templates).
QWEN = """{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>\nReturn each call within <tool_call></tool_call> tags:\n<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>{%- endif %}"""
LLAMA31 = """<|start_header_id|>system<|end_header_id|>{%- if builtin_tools is defined %}Environment: ipython
{%- endif %}Respond in the format {"name": function name, "parameters": dictionary of argument name and its
value}.{%- for t in tools %}{{- t | tojson(indent=4) }}{%- endfor %}{{- '<|python_tag|>' }}<|eot_id|>"""
LLAMA32 = """{%- if tools is not none %}Given the following functions, respond with a JSON for a function call
{"name": function name, "parameters": dictionary of argument name and its value}{%- endif %}<|eot_id|>"""
MISTRAL = """{%- if tools is not none and loop.last %}[AVAILABLE_TOOLS] {{- tools | tojson }}
[/AVAILABLE_TOOLS]{%- endif %}{%- if message.tool_calls %}[TOOL_CALLS] [{%- endif %}"""
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Gemma-like: the system text joins the first user turn, and roles must alternate user / model.
GEMMA = """{%- set sys = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' else '' -%}
{%- for m in (messages[1:] if sys else messages) -%}
{%- if (m['role'] == 'user') != (loop.index0 is even) -%}{{ raise_exception('roles must alternate') }}
{%- endif -%}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n
{{- (sys if loop.first else '') + m['content'] }}<end_of_turn>\n{%- endfor -%}<start_of_turn>model\n"""
HERMES_LLAMA = "<|start_header_id|>{{ role }}<|end_header_id|> <tool_call> <|eot_id|> parameters tools"


@pytest.mark.parametrize(("template", "name"), [
    (QWEN, "hermes"), (LLAMA31, "llama3"), (LLAMA32, "llama3"), (MISTRAL, "mistral"), (CHATML, "generic"),
    (GEMMA, "generic"), (None, "generic"), ("", "generic"), (HERMES_LLAMA, "hermes"),
])
def test_detect_format(template: str | None, name: str) -> None:
    assert detect_format(template).name == name
    assert get_format(name).name == name
    assert [f.name for f in FORMATS] == ["hermes", "mistral", "llama3", "generic"]


def test_get_format_unknown() -> None:
    from ember.errors import ParameterError

    with pytest.raises(ParameterError, match="unknown 'nope'"):
        get_format("nope")


# ---- prepare ----------------------------------------------------------------------------------------
HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": W}},
        {"id": "call_def", "type": "function", "function": {"name": "get_weather", "arguments": R}},
    ]},
    {"role": "tool", "tool_call_id": "call_abc", "content": "18 C"},
    {"role": "tool", "tool_call_id": "call_def", "content": "22 C"},
]


def test_native_prepare() -> None:
    msgs, kwargs = get_format("hermes").prepare(HISTORY, TOOLS, "auto")
    assert kwargs == {"tools": [t.openai() for t in TOOLS]}
    assert msgs[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}  # templates tojson it
    assert HISTORY[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # input untouched
    assert msgs[3] == HISTORY[3] and msgs[:2] == HISTORY[:2]
    assert get_format("hermes").prepare(HISTORY, TOOLS, "none")[1] == {}
    # a ToolCall from a previous reply goes back in as it is
    m = get_format("hermes").prepare([{"role": "assistant", "content": None,
                                       "tool_calls": [ToolCall("call_1", "search", S)]}], TOOLS, "auto")[0]
    assert m[0]["tool_calls"][0] == {"id": "call_1", "type": "function",
                                     "function": {"name": "search", "arguments": json.loads(S)}}
    tpl = ("{% for m in messages %}{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>\n"
           '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>'
           "{% endfor %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}")
    out = _tokenizer().apply_chat_template(msgs, chat_template=tpl, **kwargs)
    assert hermes("get_weather", W) in out


def test_llama3_prepare_splits_parallel_calls() -> None:
    msgs, _ = get_format("llama3").prepare(HISTORY, TOOLS, "auto")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "assistant", "tool", "tool"]
    assert [len(m.get("tool_calls", [])) for m in msgs[2:4]] == [1, 1]
    assert msgs[3]["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"}


def test_mistral_prepare_maps_ids() -> None:
    msgs, _ = get_format("mistral").prepare(HISTORY, TOOLS, "auto")
    ids = [c["id"] for c in msgs[2]["tool_calls"]]
    assert all(len(i) == 9 and i.isalnum() for i in ids) and ids[0] != ids[1]
    assert [msgs[3]["tool_call_id"], msgs[4]["tool_call_id"]] == ids
    assert short_id("call_abc") == ids[0] == short_id("call_abc")  # deterministic
    assert short_id("abcDEF123") == "abcDEF123"  # already valid


def test_generic_prepare_renders_with_chatml_and_alternates_for_gemma() -> None:
    history = [*HISTORY, {"role": "user", "content": "And Oslo?"}]
    msgs, kwargs = get_format("generic").prepare(history, TOOLS, "auto")
    assert kwargs == {}
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    sys = msgs[0]["content"]
    assert sys.endswith("\n\nBe brief.") and '"name": "get_weather"' in sys
    assert '"required": ["query", "limit"]' in sys
    assert '{"content": "<your answer>"}' in sys
    # the reply it would have produced, in the grammar's JSON style
    assert msgs[2]["content"] == ('{"tool_calls": [' + mcall("get_weather", W) + ", "
                                  + mcall("get_weather", R) + "]}")
    assert msgs[3]["content"] == ("Tool result (get_weather, call_abc): 18 C\n\n"
                                  "Tool result (get_weather, call_def): 22 C\n\nAnd Oslo?")
    tok = _tokenizer()
    chatml = tok.apply_chat_template(msgs, chat_template=CHATML)
    assert "<|im_start|>user\nTool result (get_weather, call_abc)" in chatml
    gemma = tok.apply_chat_template(msgs, chat_template=GEMMA)
    assert gemma.count("<start_of_turn>user") == 2 and gemma.count("<start_of_turn>model") == 2
    with pytest.raises(TemplateError, match="roles must alternate"):  # what the rewrite avoids
        raw = [HISTORY[1], {"role": "assistant", "content": "ok"}, HISTORY[3]]
        tok.apply_chat_template(raw, chat_template=GEMMA)
    # without a system message one is inserted; "required" and a named tool change the instructions
    msgs, _ = get_format("generic").prepare(HISTORY[1:], TOOLS, "required")
    assert msgs[0]["role"] == "system" and "<your answer>" not in msgs[0]["content"]
    tok.apply_chat_template(msgs, chat_template=GEMMA)
    msgs, _ = get_format("generic").prepare(HISTORY[1:2], TOOLS, "search")
    assert 'Call the tool search: {"tool_calls": [{"name": "search"' in msgs[0]["content"]
    # "none": no tools described, history still rewritten
    msgs, _ = get_format("generic").prepare(HISTORY, TOOLS, "none")
    assert msgs[0] == HISTORY[0] and msgs[3]["role"] == "user"


# ---- grammars ---------------------------------------------------------------------------------------
class Place(BaseModel):
    city: str


_TOK: list[Any] = []


def _tokenizer() -> Tokenizer:
    """SmolLM2's tokenizer plus the formats' tokens: control tokens special, Qwen's tags not special."""
    if not _TOK:
        from ember.hub import resolve_model
        from ember.weights.gguf import GGUFFile

        base = Tokenizer.from_gguf_metadata(GGUFFile(resolve_model("smollm2-135m")).metadata)
        backend = tokenizers.Tokenizer.from_str(base.backend.to_str())
        backend.add_special_tokens(["[TOOL_CALLS]", "<|python_tag|>", "<|eot_id|>", "<|eom_id|>"])
        backend.add_tokens(["<tool_call>", "</tool_call>", "<think>", "</think>"])
        tok = Tokenizer(backend, bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id,
                        add_bos=False, chat_template=None)
        ll = llguidance.LLTokenizer(backend.to_str(), eos_token=sorted(tok.eos_token_ids))
        _TOK.extend([tok, ll, base])
    return _TOK[0]


def accepts(fmt: str, choice: str, parallel: bool, text: str, ids: list[int] | None = None) -> bool:
    tok = _tokenizer()
    grammar = get_format(fmt).grammar(TOOLS, choice, parallel, tok)
    assert grammar is not None and llguidance.LLMatcher.validate_grammar(grammar) == ""
    m = llguidance.LLMatcher(_TOK[1], grammar, log_level=0)
    assert not m.is_error(), m.get_error()
    ids = tok.encode(text, add_special_tokens=False) if ids is None else ids
    return m.consume_tokens(ids) and m.is_accepting()


L2 = mcall("get_weather", W, "parameters") + "; " + mcall("search", S, "parameters")
M2 = "[TOOL_CALLS][" + mcall("get_weather", W) + ", " + mcall("search", S) + "]"
G2 = '{"tool_calls": [' + mcall("get_weather", W) + ", " + mcall("search", S) + "]}"
BAD_NAME = '{"name": "get_wether", "arguments": {"city": "Paris"}}'
BAD_ARGS = '{"name": "get_weather", "arguments": {"city": 12}}'
MISSING = '{"name": "search", "arguments": {"query": "x"}}'
EXTRA = '{"name": "search", "arguments": {"query": "x", "limit": 3}, "id": "abc"}'
LOOSE = '{"name":"search","arguments":{"query":"x","limit":3}}'  # valid JSON, not the compact style


@pytest.mark.parametrize(("fmt", "choice", "parallel", "text", "ok"), [
    ("hermes", "auto", True, "Just text, with <b>tags</b> and {braces}.", True),
    ("hermes", "auto", True, "Sure.\n" + hermes("get_weather", U) + "\n" + hermes("search", S), True),
    ("hermes", "auto", False, hermes("get_weather", W), True),
    ("hermes", "auto", False, hermes("get_weather", W) + "\n" + hermes("search", S), False),
    ("hermes", "auto", True, "<tool_call>\nno json here", False),
    ("hermes", "auto", True, f"<tool_call>\n{BAD_NAME}\n</tool_call>", False),
    ("hermes", "auto", True, f"<tool_call>\n{BAD_ARGS}\n</tool_call>", False),
    ("hermes", "auto", True, f"<tool_call>\n{MISSING}\n</tool_call>", False),
    ("hermes", "auto", True, f"<tool_call>\n{LOOSE}\n</tool_call>", False),
    ("hermes", "auto", True, f"<tool_call>\n{EXTRA}\n</tool_call>", False),
    ("hermes", "required", True, hermes("search", S) + "\n" + hermes("get_weather", W), True),
    ("hermes", "required", False, hermes("search", S) + "\n" + hermes("get_weather", W), False),
    ("hermes", "required", True, "I'd rather talk.", False),
    ("hermes", "required", True, "<think>\nThe user wants...\n</think>\n\n" + hermes("search", S), True),
    ("hermes", "required", True, "<think>\nNo need.\n</think>\n\nHello!", False),
    ("hermes", "get_weather", True, hermes("get_weather", W), True),
    ("hermes", "get_weather", False, "<think>\n</think>\n\n" + hermes("get_weather", W), True),
    ("hermes", "get_weather", True, hermes("search", S), False),
    ("llama3", "auto", True, "Text that has {braces} later.", True),
    ("llama3", "auto", True, L2, True),
    ("llama3", "auto", False, L2, False),
    ("llama3", "auto", True, "<|python_tag|>" + mcall("get_weather", U, "parameters"), True),
    ("llama3", "auto", True, "{not a call}", False),
    # the parser reads a call after leading blanks, so the grammar must hold it to the schema there too
    ("llama3", "auto", True, " " + BAD_NAME.replace("arguments", "parameters"), False),
    ("llama3", "auto", True, "\n" + BAD_ARGS.replace("arguments", "parameters"), False),
    ("llama3", "auto", True, "\n" + mcall("search", S, "parameters"), True),
    ("llama3", "auto", True, "  Text after blanks.", True),
    ("llama3", "auto", True, mcall("get_weather", W, "arguments"), False),
    ("llama3", "auto", True, BAD_ARGS.replace("arguments", "parameters"), False),
    ("llama3", "required", True, "Hello", False),
    ("llama3", "required", True, mcall("search", S, "parameters"), True),
    ("llama3", "search", True, "<|python_tag|>" + mcall("search", S, "parameters"), True),
    ("llama3", "search", True, mcall("get_weather", W, "parameters"), False),
    ("mistral", "auto", True, "Plain [text] {here}.", True),
    ("mistral", "auto", True, M2, True),
    ("mistral", "auto", True, "[TOOL_CALLS] [" + mcall("get_weather", U) + "]", True),
    ("mistral", "auto", False, M2, False),
    ("mistral", "auto", True, "[TOOL_CALLS] and then text", False),
    ("mistral", "auto", True, f"[TOOL_CALLS][{BAD_NAME}]", False),
    ("mistral", "required", True, "No.", False),
    ("mistral", "required", True, "[TOOL_CALLS][" + mcall("search", S) + "]", True),
    ("mistral", "get_weather", True, M2, False),
    ("generic", "auto", True, '{"content": "Hi \\"there\\"\\nbye 東京"}', True),
    ("generic", "auto", True, G2.replace(W, U), True),
    ("generic", "auto", False, G2, False),
    ("generic", "auto", True, "Plain text", False),
    ("generic", "auto", True, '{"tool_calls": []}', False),
    ("generic", "auto", True, '{"tool_calls": [' + EXTRA + "]}", False),
    ("generic", "auto", True, '{"content": "x", "tool_calls": [' + mcall("search", S) + "]}", False),
    ("generic", "auto", True, '{"tool_calls": [' + BAD_ARGS + "]}", False),
    ("generic", "required", True, '{"content": "no"}', False),
    ("generic", "required", True, '{"tool_calls": [' + mcall("search", S) + "]}", True),
    ("generic", "get_weather", True, '{"tool_calls": [' + mcall("search", S) + "]}", False),
    ("generic", "get_weather", True, '{"tool_calls": [' + mcall("get_weather", W) + "]}", True),
])
def test_grammar(fmt: str, choice: str, parallel: bool, text: str, ok: bool) -> None:
    assert accepts(fmt, choice, parallel, text) is ok
    if ok:  # what the grammar lets through, the parser reads back
        content, calls = get_format(fmt).parse(text, TOOLS)
        assert len(calls) == text.count('"name": ')
        starts_with_call = text.lstrip().startswith(("<tool_call>", "{", "[TOOL_CALLS]", "<|python_tag|>"))
        assert bool(content) == (not calls or not starts_with_call)
        assert all(c.name in ("get_weather", "search") and isinstance(c.parsed_arguments(), dict)
                   for c in calls)


def test_grammar_accepts_spelled_out_tags() -> None:
    """A model may write <tool_call> as its own token or in pieces; llguidance sees the token as special."""
    _tokenizer()
    base = _TOK[2]
    text = hermes("search", S)
    whole = _TOK[0].encode(text, add_special_tokens=False)
    assert _TOK[0].backend.token_to_id("<tool_call>") in whole  # the added token itself
    assert accepts("hermes", "required", True, text, whole)
    assert accepts("hermes", "required", True, text, base.encode(text, add_special_tokens=False))
    assert accepts("hermes", "auto", True, "Hi " + text, base.encode("Hi " + text, add_special_tokens=False))


def test_grammar_none_and_refs() -> None:
    tok = _tokenizer()
    for f in FORMATS:
        assert f().grammar(TOOLS, "none", True, tok) is None

    def visit(places: list[Place], again: bool = False) -> None:
        """Visit places."""

    tools = normalize_tools([visit, *TOOLS])
    args = '{"places": [{"city": "Oslo"}], "again": true}'
    for fmt, text in [("hermes", hermes("visit", args)), ("llama3", mcall("visit", args, "parameters")),
                      ("mistral", "[TOOL_CALLS][" + mcall("visit", args) + "]"),
                      ("generic", '{"tool_calls": [' + mcall("visit", args) + "]}")]:
        for choice in ("auto", "visit"):
            grammar = get_format(fmt).grammar(tools, choice, True, tok)
            m = llguidance.LLMatcher(_TOK[1], grammar, log_level=0)  # type: ignore[arg-type]
            ids = tok.encode(text, add_special_tokens=False)
            assert m.consume_tokens(ids) and m.is_accepting(), (fmt, choice)
            bad = llguidance.LLMatcher(_TOK[1], grammar, log_level=0)  # type: ignore[arg-type]
            assert not bad.consume_tokens(tok.encode(text.replace('"Oslo"', "3"), add_special_tokens=False))
