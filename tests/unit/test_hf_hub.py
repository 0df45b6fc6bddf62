"""`ember pull org/name` against a stand-in hub on 127.0.0.1: the endpoints huggingface_hub calls for a
small repo (revision info, file tree, HEAD + ranged GET of each file), a dropped connection that resumes,
--include, and an offline load from the cache afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

import ember
from ember.errors import EmberError, ModelNotFoundError
from ember.hub import pull
from tests.models.tiny_gguf import write_tiny_gguf

SHA = "0123456789abcdef0123456789abcdef01234567"


class Hub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.repos = repos
        self.ranges: list[str] = []
        self.auth: set[str | None] = set()  # Authorization headers seen
        self.cut: dict[str, int] = {}  # file -> bytes its first plain GET sends before the connection drops
        self.requests = 0
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: Hub

    def log_message(self, *args) -> None:  # quiet
        pass

    def _json(self, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route(self, head: bool) -> None:
        self.server.requests += 1
        self.server.auth.add(self.headers.get("Authorization"))
        path = unquote(urlparse(self.path).path)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo = "/".join(parts[2:4])
            files = self.server.repos.get(repo)
            if files is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "RepoNotFound")
                self.end_headers()
                return
            if parts[4] == "revision":
                return self._json({"id": repo, "modelId": repo, "sha": SHA, "private": False,
                                   "siblings": [{"rfilename": f} for f in files]})
            return self._json([{"type": "file", "oid": hashlib.sha1(b).hexdigest(), "size": len(b), "path": f}
                               for f, b in files.items()])
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            data = self.server.repos.get(repo, {}).get(name)
            if data is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.end_headers()
                return
            start = 0
            rng = self.headers.get("Range")
            if rng and not head:
                self.server.ranges.append(f"{name} {rng}")
                start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", SHA)
            self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if head:
                return
            if name in self.server.cut and not start:
                self.wfile.write(data[: self.server.cut.pop(name)])
                self.wfile.flush()
                self.close_connection = True  # the rest never comes
                return
            self.wfile.write(data[start:])
            return
        self.send_response(404)
        self.end_headers()

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path


def test_interrupted_pull_resumes(hub_env, monkeypatch):
    """A connection that drops mid-file: the download goes on from the bytes already on disk."""
    big = os.urandom(25 << 20)  # past huggingface_hub's 10 MiB write chunks, so some bytes are on disk
    hub = Hub({"org/big": {"big.gguf": big, "config.txt": b"x"}})
    hub.cut["big.gguf"] = 15 << 20
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    try:
        path = pull("org/big", quiet=True)
        assert path.read_bytes() == big
        assert hub.ranges == [f"big.gguf bytes={10 << 20}-"]  # resumed at the written bytes, not restarted
    finally:
        hub.shutdown()
        hub.server_close()


def test_pull_include_then_load_offline(hub_env, monkeypatch):
    gguf = write_tiny_gguf(hub_env / "tiny.gguf").read_bytes()
    hub = Hub({"org/tiny-GGUF": {"tiny.Q8_0.gguf": gguf, "tiny.F16.gguf": gguf[:100], "README.md": b"# tiny\n"}})
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    try:
        path = pull("org/tiny-GGUF", include=["*Q8_0.gguf"], quiet=True)
        assert path.name == "tiny.Q8_0.gguf" and path.read_bytes() == gguf
        assert not list(Path(path).parent.glob("*.F16.gguf"))  # --include kept the other file out
        assert hub.auth == {"Bearer hf_test_token"}  # HF_TOKEN, read when pull is called
    finally:
        hub.shutdown()
        hub.server_close()
    # the hub is gone: a cached model loads without the network
    before = hub.requests
    llm = ember.load("org/tiny-GGUF", dtype="float32")
    assert llm.generate("hello", ember.SamplingParams(max_tokens=3, temperature=0))[0].token_ids
    assert hub.requests == before


def test_hub_errors_say_what_to_do(hub_env, monkeypatch):
    hub = Hub({"org/two": {"a.Q4_0.gguf": b"x" * 10, "b.Q8_0.gguf": b"y" * 10}})
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    try:
        with pytest.raises(ModelNotFoundError, match="no model repo 'org/missing'"):
            pull("org/missing", quiet=True)
        with pytest.raises(EmberError, match="--include"):
            pull("org/two", quiet=True)
    finally:
        hub.shutdown()
        hub.server_close()
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(EmberError, match="cannot reach"):
        pull("org/never-cached", quiet=True)
