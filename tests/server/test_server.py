"""`ember serve` against the official openai client and raw HTTP, on a tiny random model (chatml template)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

import ember
from ember.server.app import create_app
from tests.models.tiny_gguf import write_tiny_gguf

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MSGS = [{"role": "user", "content": "Hello there, how are you?"}]


class Served:
    """A uvicorn server in a thread on a free loopback port."""

    def __init__(self, llm: ember.LLM, api_key: str | None = None, name: str = "tiny") -> None:
        self.llm = llm
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(llm, name, api_key), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.02)
        self.start_free = llm.engine.kv.num_free_blocks

    def idle(self, timeout: float = 10.0) -> bool:
        """Wait until the engine has nothing left and every block is free again."""
        end = time.time() + timeout
        while time.time() < end:
            eng = self.llm.engine
            if not eng.has_unfinished() and eng.kv.num_free_blocks == self.start_free:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", template=CHATML)


@pytest.fixture(scope="module")
def served(tiny_path):
    s = Served(ember.load(tiny_path, dtype="float32"))
    yield s
    s.stop()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused")


def test_chat_and_usage(client, served):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length") and isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 5
    assert client.models.list().data[0].id == "tiny"
    assert served.idle()


def test_streamed_chat_with_usage_matches_non_streamed(client):
    kw = dict(model="tiny", messages=MSGS, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_stop_n_seed_logprobs(client):
    free = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0)
    text = free.choices[0].text
    assert len(text) > 6
    stop = text[3:6]
    cut = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    two = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, n=2, seed=5,
                                    temperature=1.0)
    assert [c.index for c in two.choices] == [0, 1]
    again = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, n=2, seed=5,
                                      temperature=1.0)
    assert [c.text for c in again.choices] == [c.text for c in two.choices]
    lp = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=4, temperature=0,
                                   echo=True, logprobs=2)
    c = lp.choices[0]
    assert c.text.startswith("Once upon a time") and c.logprobs.token_logprobs[0] is None
    assert all(v <= 0 for v in c.logprobs.token_logprobs[1:]) and len(c.logprobs.top_logprobs[-1]) == 2


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)  # greedy took the best


def test_async_client_streams(served):
    async def main():
        c = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused")
        r = await c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=6, temperature=0)
        s = await c.completions.create(model="tiny", prompt="abc", max_tokens=6, temperature=0, stream=True)
        parts = [ch.choices[0].text async for ch in s if ch.choices]
        return r, parts

    r, parts = asyncio.run(main())
    assert r.choices[0].message.content is not None and len(parts) >= 2


def test_unknown_fields_and_bad_requests_are_refused(client, served):
    with pytest.raises(openai.BadRequestError, match="functions"):  # the deprecated form of tools
        client.chat.completions.create(model="tiny", messages=MSGS, functions=[{"name": "f", "parameters": {}}])
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model="tiny", prompt="x", best_of=2)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=MSGS)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="word " * 100, max_tokens=250)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=MSGS, temperature=-1)
    bad = httpx.post(served.url + "/v1/chat/completions", content=b"{not json", timeout=10)
    assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]["message"]
    assert served.idle()


def test_raw_sse_shapes_and_order(served):
    body = {"model": "tiny", "messages": MSGS, "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length") and events[-1]["choices"][0]["delta"] == {}
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])


def _generated(served) -> int:
    return served.llm.engine.num_tokens_computed  # positions the engine ran, whoever was listening


def test_disconnect_aborts_and_frees(served):
    body = {"model": "tiny", "prompt": "a b c", "max_tokens": 240, "temperature": 0, "stream": True,
            "ignore_eos": True}
    before = _generated(served)
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=30) as r:
        got = 0
        for ln in r.iter_lines():
            got += ln.startswith("data: ")
            if got == 3:
                break  # leaving the block closes the connection mid-stream
    assert served.idle() and _generated(served) - before < 200
    before = _generated(served)
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(served.url + "/v1/completions", json={**body, "stream": False}, timeout=0.05)
    assert served.idle() and 0 < _generated(served) - before < 200  # it started, and stopped early


def test_cancel_by_id(served):
    body = {"model": "tiny", "prompt": "a b c", "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}
    finish = None
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=30) as r:
        for ln in r.iter_lines():
            if not ln.startswith("data: {"):
                continue
            ev = json.loads(ln[6:])
            if finish is None and not ev["choices"][0]["finish_reason"]:
                assert httpx.post(f"{served.url}/v1/requests/{ev['id']}/cancel", timeout=10).status_code == 200
                finish = "asked"
            if ev["choices"] and ev["choices"][0]["finish_reason"]:
                finish = ev["choices"][0]["finish_reason"]
    assert finish == "abort" and served.idle()
    assert httpx.post(f"{served.url}/v1/requests/nope/cancel", timeout=10).status_code == 404


def test_64_concurrent_streams_then_all_blocks_free(served):
    async def one(c: httpx.AsyncClient, i: int) -> int:
        body = {"model": "tiny", "prompt": f"request {i}:", "max_tokens": 64, "temperature": 0, "stream": True,
                "ignore_eos": True}
        n = 0
        async with c.stream("POST", served.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for ln in r.aiter_lines():
                if ln.startswith("data: {") and json.loads(ln[6:])["choices"][0]["text"]:
                    n += 1
        return n

    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(one(c, i) for i in range(64)), return_exceptions=True)

    res = asyncio.run(main())
    assert [r for r in res if isinstance(r, BaseException)] == []
    assert all(r >= 32 for r in res)  # text deltas (a few tokens may be held back as partial UTF-8)
    assert served.idle()
    metrics = httpx.get(served.url + "/metrics", timeout=10).text
    assert 'ember_requests_total{endpoint="completions",outcome="ok"}' in metrics
    assert "ember_kv_blocks_used 0" in metrics


def test_api_key_and_template_errors(tiny_path):
    broken = "{{ raise_exception('only user messages, please') }}"
    s = Served(ember.load(tiny_path, dtype="float32", chat_template=broken), api_key="sekrit")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong").models.list()
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200  # no key needed
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="sekrit")
        assert ok.models.list().data[0].id == "tiny"
        with pytest.raises(openai.BadRequestError, match="only user messages"):
            ok.chat.completions.create(model="tiny", messages=MSGS)
    finally:
        s.stop()


def test_prompt_checks_and_echo_logprobs_offsets(client, served):
    for bad in ([5, -3], [5, 100000], []):
        r = httpx.post(served.url + "/v1/completions", timeout=10,
                       json={"model": "tiny", "prompt": bad, "max_tokens": 0, "echo": True, "logprobs": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    long = httpx.post(served.url + "/v1/completions", timeout=30,
                      json={"model": "tiny", "prompt": list(range(1, 301)), "max_tokens": 0, "echo": True,
                            "logprobs": 1})
    assert long.status_code == 400 and "cannot score" in long.json()["error"]["message"]
    r = client.completions.create(model="tiny", prompt="hello the", max_tokens=3, temperature=0, echo=True,
                                  logprobs=1)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text  # every token, the prompt's first included
    assert lp.token_logprobs[0] is None and lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset[1:] == [lp.text_offset[i] + len(lp.tokens[i]) for i in range(len(lp.tokens) - 1)]
    with pytest.raises(openai.BadRequestError, match="chat_template"):
        client.chat.completions.create(model="tiny", messages=MSGS, extra_body={
            "chat_template_kwargs": {"chat_template": "{{ 'mine' }}"}})
    assert served.idle()
