"""Tool calling from Python: `llm.chat(messages, params, tools=[...])` with plain functions as tools, whole and
streamed; and the native formats end to end on a tiny random model whose template speaks them (the grammar
alone must make its calls valid)."""

from __future__ import annotations

import json

import jsonschema
import pytest

import ember
from ember import SamplingParams
from ember.structured.tools import normalize_tools
from tests.models.tiny_gguf import write_tiny_gguf


def get_weather(city: str, unit: str = "celsius") -> str:
    """Get the current weather in a city.

    Args:
        city: The city name, e.g. Paris.
        unit: celsius or fahrenheit.
    """
    return f"18 degrees {unit} in {city}"


def get_time(timezone: str) -> str:
    """Get the current local time in a timezone.

    Args:
        timezone: IANA name, e.g. Asia/Tokyo.
    """
    return f"12:00 in {timezone}"


ASK = [{"role": "user", "content": "What's the weather in Paris and the time in Tokyo?"}]
SCHEMAS = {t.name: t.parameters for t in normalize_tools([get_weather, get_time])}


@pytest.fixture(scope="module")
def llm(smollm_gguf):
    return ember.load(smollm_gguf)


def test_python_functions_as_tools_whole_and_streamed(llm):
    params = SamplingParams(temperature=0, max_tokens=150)
    out = llm.chat(ASK, params, tools=[get_weather, get_time], tool_choice="required")
    assert out.finish_reason == "tool_calls" and out.text == ""
    assert [c.name for c in out.tool_calls] == ["get_weather", "get_time"]
    for c in out.tool_calls:
        assert c.id.startswith("call_")
        jsonschema.validate(c.parsed_arguments(), SCHEMAS[c.name])
    deltas = list(llm.chat(ASK, params, tools=[get_weather, get_time], tool_choice="required", stream=True))
    assert deltas[-1].finish_reason == "tool_calls" and deltas[-1].finished
    args: dict[int, str] = {}
    names: dict[int, str] = {}
    for d in deltas:
        for t in d.tool_calls or []:
            if t.name:
                names[t.index] = t.name
            args[t.index] = args.get(t.index, "") + t.arguments
    assert [names[i] for i in sorted(names)] == [c.name for c in out.tool_calls]
    assert [json.loads(args[i]) for i in sorted(args)] == [c.parsed_arguments() for c in out.tool_calls]
    named = llm.chat(ASK, params, tools=[get_weather, get_time], tool_choice="get_time")
    assert [c.name for c in named.tool_calls] == ["get_time"]


def test_round_trip_and_leaving_a_stream_early(llm):
    params = SamplingParams(temperature=0, max_tokens=60)
    first = llm.chat(ASK[:1], params, tools=[get_weather], tool_choice="required")
    call = first.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": call.id, "content": get_weather(**call.parsed_arguments())}]
    reply = llm.chat(history, params, tools=[get_weather], tool_choice="none")
    assert reply.text and not reply.tool_calls and reply.finish_reason in ("stop", "length")
    stream = llm.chat(ASK, params, tools=[get_weather], tool_choice="required", stream=True)
    next(stream)
    stream.close()
    eng = llm.engine
    assert not eng.requests and eng.kv.num_free_blocks == eng.kv.num_blocks


HERMES = (
    "{% if tools %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t['function']['name'] }}\n{% endfor %}"
    "Call one inside <tool_call></tool_call> tags.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}<tool_call>\n{{ c['function'] | tojson }}\n"
    "</tool_call>{% endfor %}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if tools %}JSON calls (name, parameters) of: {% for t in tools %}{{ t['function']['name'] }} {% endfor %}"
    "<|python_tag|>{% endif %}assistant: ")


@pytest.mark.parametrize("template, fmt", [(HERMES, "hermes"), (LLAMA3, "llama3")])
def test_native_formats_end_to_end_on_a_random_model(tmp_path, template, fmt):
    from ember.structured.formats import detect_format

    assert detect_format(template).name == fmt
    tiny = ember.load(write_tiny_gguf(tmp_path / f"{fmt}.gguf", template=template), dtype="float32")
    # bounded arguments: a random model closes a free string only by chance (1 byte in 256)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
                "type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                                 "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"]}}},
             {"type": "function", "function": {"name": "get_time", "parameters": {
                 "type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}},
                 "required": ["hour"]}}}]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    ask = [{"role": "user", "content": "Weather?"}]
    for seed in range(3):  # one call each: a random model would chain calls at random under parallel
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=100)
        out = tiny.chat(ask, params, tools=tools, tool_choice="required", parallel_tool_calls=False)
        assert out.finish_reason == "tool_calls" and len(out.tool_calls) == 1, out
        for c in out.tool_calls:
            jsonschema.validate(c.parsed_arguments(), schemas[c.name])
        one = tiny.chat(ask, params, tools=tools, tool_choice="get_weather")
        assert one.finish_reason == "tool_calls" and [c.name for c in one.tool_calls] == ["get_weather"]
    auto = tiny.chat(ask, SamplingParams(temperature=1.0, seed=9, max_tokens=40), tools=tools)
    assert auto.finish_reason in ("stop", "length", "tool_calls")  # random text is a fine answer under auto


def test_bad_inputs_and_a_cut_call(llm):
    from ember.errors import ParameterError

    for bad, words in (("hi", "messages must be a list"), (["hi"], r"messages\[0\]"),
                       ([{"role": "assistant", "content": None, "tool_calls": ["x"]}], "tool_calls")):
        with pytest.raises(ParameterError, match=words):
            llm.chat(bad, tools=[get_weather])
    with pytest.raises(ParameterError, match="parallel_tool_calls"):
        llm.chat(ASK, tools=[get_weather], parallel_tool_calls="no")
    with pytest.raises(ParameterError, match=r"tools\[0\]"):
        llm.chat(ASK, tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}])
    # max_tokens mid-call: finish "length", the call as far as it got (as its streamed deltas join up)
    cut = llm.chat(ASK, SamplingParams(temperature=0, max_tokens=20), tools=[get_weather], tool_choice="required")
    assert cut.finish_reason == "length" and cut.text == ""
    assert [c.name for c in cut.tool_calls] == ["get_weather"]
    with pytest.raises(json.JSONDecodeError):
        cut.tool_calls[0].parsed_arguments()
