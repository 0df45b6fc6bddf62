"""`ember serve --replicas 2` on a real local Ray instance (started by the fixture, stopped by its process
group): the same answers as one `ember serve`, prefix affinity, client disconnects, and a replica killed
in the middle of 16 streams. Bounded in time; the slowest tests of the suite, so kept few."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

import ember
from tests.server.test_server import Served

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ember[ray]')")
pytestmark = pytest.mark.ray

MODEL = "smollm2-135m"
QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow.", "Write a haiku about rain."]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(url: str) -> dict[str, float]:
    """'name{labels}' -> value, from the ingress's /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}


def replicas(url: str) -> dict[str, int]:
    """replica id -> its process id."""
    out = {}
    for key in metrics(url):
        m = re.fullmatch(r'ember_replica_info\{replica="([^"]+)",pid="(\d+)"\}', key)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def wait_for(cond, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        try:
            got = cond()
        except httpx.HTTPError:
            got = None
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(smollm_gguf: Path):
    port = _port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "ember", "serve", "-m", str(smollm_gguf), "--served-model-name",
                             MODEL, "--port", str(port), "--replicas", "2", "--replica-cpus", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()  # type: ignore[arg-type]
    try:
        wait_for(lambda: proc.poll() is None and len(replicas(url)) == 2 or proc.poll() is not None, 180,
                 "2 replicas up")
        assert proc.poll() is None, "".join(log)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)  # ember stops Serve and the Ray instance it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def single(smollm_gguf: Path):
    s = Served(ember.load(smollm_gguf), name=MODEL)
    yield s
    s.stop()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0)


def _answers(url: str) -> list[str]:
    c, out = _client(url), []
    for q in QUESTIONS:
        msgs = [{"role": "user", "content": q}]
        out.append(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0)
                   .choices[0].message.content)
        chunks = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0, stream=True)
        out.append("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices))
    out.append(c.completions.create(model=MODEL, prompt="The three primary colours are", max_tokens=16,
                                    temperature=0).choices[0].text)
    return out


def test_same_greedy_text_as_one_server(cluster, single):
    assert _answers(cluster) == _answers(single.url)


def test_errors_keep_their_shape_through_ray(cluster):
    c = _client(cluster)
    with pytest.raises(openai.BadRequestError) as e:  # raised by the replica's engine, not the ingress
        c.completions.create(model=MODEL, prompt="hello " * 9000, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="hi", max_tokens=4)
    assert [m.id for m in c.models.list().data] == [MODEL]
    assert httpx.get(cluster + "/health", timeout=10).json()["status"] == "ok"
    page = httpx.get(cluster + "/", timeout=10)  # the chat page comes with the ingress too
    assert page.status_code == 200 and "ui/app.js" in page.text and "content-security-policy" in page.headers
    assert httpx.get(cluster + "/ui/app.js", timeout=10).status_code == 200


def test_turns_of_a_conversation_reuse_one_replicas_prefix(cluster):
    c = _client(cluster)
    story = " ".join(f"Fact {i}: the {w} is on shelf {i}." for i, w in enumerate(
        "lamp book cup pen clock vase box hat key map coin sock".split()))
    msgs = [{"role": "user", "content": f"Remember these facts. {story} Which shelf has the cup?"}]
    prev = 0
    for turn in range(3):
        r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
        cached = r.usage.prompt_tokens_details.cached_tokens
        if turn:  # on another replica only the template's shared system prompt could be cached
            assert cached >= prev // 16 * 16 >= 128, (turn, cached, prev)
        prev = r.usage.prompt_tokens
        msgs += [{"role": "assistant", "content": r.choices[0].message.content},
                 {"role": "user", "content": ["And the pen?", "And the key?", "Thanks."][turn]}]


def _idle(url: str) -> bool:
    m = metrics(url)
    keys = [k for k in m if k.startswith(("ember_requests_running{", "ember_kv_blocks_used{"))]
    return len(keys) == 4 and all(m[k] == 0 for k in keys)


def test_a_client_that_leaves_aborts_its_request_on_the_replica(cluster):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", cluster + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        wait_for(lambda: metrics(cluster)["ember_requests_running"] == 1, 15, "the request running")
    wait_for(lambda: _idle(cluster), 20, "the replicas to stop the request and free its blocks")


def test_the_cancel_endpoint_ends_a_stream_on_its_replica(cluster):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", cluster + "/v1/completions", json=body, timeout=60) as r:
        events = (json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {"))
        rid = next(events)["id"]
        assert httpx.post(f"{cluster}/v1/requests/{rid}/cancel", timeout=10).json()["cancelled"]
        finish = [ev["choices"][0]["finish_reason"] for ev in events if ev["choices"]]
    assert finish[-1] == "abort" and len(finish) < 2000
    wait_for(lambda: _idle(cluster), 20, "the replicas to free the request's blocks")


def _stream(url: str, i: int, started: threading.Event, results: list) -> None:
    body = {"model": MODEL, "prompt": f"Story {i}: a {['red', 'blue', 'green', 'old'][i % 4]} fox number {i * 7}",
            "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
    outcome = "hung"
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    outcome = f"error {ev['error']['code']}"
                    break
                started.set()
                if ev["choices"] and ev["choices"][0]["finish_reason"]:
                    outcome = ev["choices"][0]["finish_reason"]
    except httpx.HTTPError as e:
        outcome = f"http {type(e).__name__}"
    results[i] = outcome


def test_killing_a_replica_mid_stream_ends_every_request(cluster):
    before = replicas(cluster)
    results: list = [None] * 16
    events = [threading.Event() for _ in range(16)]
    threads = [threading.Thread(target=_stream, args=(cluster, i, events[i], results), daemon=True)
               for i in range(16)]
    for t in threads:
        t.start()
    for e in events:
        assert e.wait(60), "a stream did not start"

    def both_serve() -> bool:  # the replicas' figures reach the ingress about once a second
        running = [v for k, v in metrics(cluster).items() if k.startswith("ember_requests_running{")]
        return len(running) == 2 and all(v > 0 for v in running)

    wait_for(both_serve, 10, "both replicas running streams")
    victim, pid = next(iter(before.items()))
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(timeout=150)
    assert all(r is not None for r in results), results  # none hangs
    assert set(results) <= {"length", "error engine_unavailable"}, results
    assert "length" in results and "error engine_unavailable" in results, results
    after = wait_for(lambda: (r := replicas(cluster)) and len(r) == 2 and victim not in r and r, 180,
                     "the killed replica to be replaced")
    assert pid not in after.values()
    wait_for(lambda: _idle(cluster), 30, "every replica's KV blocks free again")
    assert _answers(cluster)[:2]  # and it serves again
