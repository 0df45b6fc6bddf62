"""Structured outputs through `ember serve` with the official openai client and SmolLM2-135M (real weights).

Sampling at temperature 1.0 on purpose: the grammar, not the model's confidence, must make every sample
valid.
"""

from __future__ import annotations

import json
import re
import threading

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "email": {"type": ["string", "null"], "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.(com|org)$"},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"$ref": "#/$defs/address"},
    },
    "required": ["name", "age", "email", "role", "address"],
    "additionalProperties": False,
    "$defs": {"address": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
        "required": ["city", "zip"], "additionalProperties": False}},
}
ASK = [{"role": "user", "content": "Make up a person: name, age, email, role and address, as JSON."}]


class Address(BaseModel):
    city: str
    country: str


class Person(BaseModel):
    name: str
    age: int
    address: Address


def fmt(schema: dict, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": strict}}


def test_json_schema_samples_all_validate_at_temperature_1(client, served):
    outs = []
    for seed in (1, 2):  # 2 x n=10: twenty samples
        r = client.chat.completions.create(model="smollm2-135m", messages=ASK, response_format=fmt(PERSON), n=10,
                                           temperature=1.0, seed=seed, max_tokens=300)
        outs += r.choices
    assert len(outs) == 20
    for c in outs:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), PERSON)
    assert len({c.message.content for c in outs}) > 5
    assert served.idle()


def test_parse_with_a_pydantic_model_and_a_cut_reply(client):
    r = client.chat.completions.parse(model="smollm2-135m", response_format=Person, temperature=0, max_tokens=200,
                                      messages=[{"role": "user", "content": "Describe a person who lives in Paris."}])
    assert isinstance(r.choices[0].message.parsed, Person)
    cut = client.chat.completions.create(model="smollm2-135m", messages=ASK, response_format=fmt(PERSON),
                                         max_tokens=4, temperature=0)
    assert cut.choices[0].finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.choices[0].message.content)


def test_json_object_choice_and_regex(client):
    # json_object constrains the form only (no key or length limits): a 135M model asked for an open-ended
    # object, or sampled at 1.0, sometimes loops inside a key or number until max_tokens (finish "length";
    # 2 of 30 at 1.0, 0 of 30 at 0.7 with these prompts), so the prompts say what the object holds
    asks = ['Reply with a JSON object with the keys "name" and "age" for a person called Tom who is 31.',
            'Give me a JSON object with the keys "city" and "country" for Paris.',
            'Return a JSON object with one key "answer" holding the answer to 2 + 2.']
    for ask in asks:
        r = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": ask}],
                                           temperature=0.7, seed=7, n=3, response_format={"type": "json_object"},
                                           max_tokens=200)
        for c in r.choices:
            assert c.finish_reason == "stop" and isinstance(json.loads(c.message.content), dict)
    pick = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Is water wet? Answer yes or no."}],
        temperature=1.0, n=5, extra_body={"structured_outputs": {"choice": ["yes", "no", "not sure"]}})
    assert all(c.message.content in ("yes", "no", "not sure") for c in pick.choices)
    rx = r"[A-Z][a-z]{2,8}, [0-9]{4}"
    comp = client.completions.create(model="smollm2-135m", prompt="A city and a year:", temperature=1.0, n=4,
                                     max_tokens=30, extra_body={"structured_outputs": {"regex": rx}})
    assert all(re.fullmatch(rx, c.text) and c.finish_reason == "stop" for c in comp.choices)


def test_requests_that_ask_for_nothing_are_accepted(served):
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
            "tools": None, "tool_choice": "none", "response_format": {"type": "text"}, "parallel_tool_calls": True,
            "logit_bias": None, "functions": None, "temperature": None, "stop": None, "n": None}
    r = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]


def test_bad_schemas_are_400s_naming_the_field_and_the_server_keeps_serving(client, served):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2-135m", messages=ASK,
                                       response_format=fmt({"type": "object", "properties": {"a": {"type": "nope"}}}))
    assert e.value.body["param"] == "response_format" and "nope" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2-135m", messages=ASK,
                                       extra_body={"structured_outputs": {"regex": "([a-z"}})
    assert e.value.body["param"] == "structured_outputs"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2-135m", messages=ASK,
                                       extra_body={"structured_outputs": {"regex": "a", "choice": ["b"]}})
    assert "exactly one" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2-135m", messages=ASK, logit_bias={"abc": 5})
    assert e.value.body["param"] == "logit_bias"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2-135m", messages=ASK, logit_bias={"99999999": 5})
    assert "outside the vocabulary" in e.value.body["message"] and e.value.body["param"] == "logit_bias"
    with pytest.raises(openai.BadRequestError) as e:  # a grammar naming a token this vocabulary lacks
        client.chat.completions.create(model="smollm2-135m", messages=ASK,
                                       extra_body={"structured_outputs": {"grammar": "start: <[99999999]>"}})
    assert e.value.body["param"] == "structured_outputs"
    ok = client.chat.completions.create(model="smollm2-135m", messages=ASK, max_tokens=4)
    assert ok.choices[0].message.content
    assert served.idle()


def test_logit_bias_forces_and_bans(client, served):
    tok = served.llm.tokenizer
    yes = tok.encode(" yes", add_special_tokens=False)[0]
    r = client.completions.create(model="smollm2-135m", prompt="The answer is", max_tokens=3, temperature=0,
                                  logit_bias={str(yes): 100})
    assert r.choices[0].text == " yes" * 3
    free = client.completions.create(model="smollm2-135m", prompt="The answer is", max_tokens=1, temperature=0)
    first = tok.encode(free.choices[0].text, add_special_tokens=False)[0]
    banned = client.completions.create(model="smollm2-135m", prompt="The answer is", max_tokens=1, temperature=0,
                                       logit_bias={str(first): -100})
    assert banned.choices[0].text != free.choices[0].text


def test_16_concurrent_mixed_requests_finish_and_plain_ones_are_unchanged(client, served):
    prompts = [f"Tell me about the number {i}." for i in range(8)]
    alone = [client.completions.create(model="smollm2-135m", prompt=p, max_tokens=24, temperature=0).choices[0].text
             for p in prompts]
    results: dict[int, object] = {}

    def run(i: int) -> None:
        if i < 8:
            results[i] = client.completions.create(model="smollm2-135m", prompt=prompts[i], max_tokens=24,
                                                   temperature=0).choices[0].text
        else:
            r = client.chat.completions.create(model="smollm2-135m", messages=ASK, response_format=fmt(PERSON),
                                               temperature=1.0, seed=i, max_tokens=300)
            results[i] = json.loads(r.choices[0].message.content)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == list(range(16))
    assert [results[i] for i in range(8)] == alone
    for i in range(8, 16):
        jsonschema.validate(results[i], PERSON)
    assert served.idle()
