"""The chat page's files as the server ships them (what the browser tests drive): the page and its modules,
the security headers, the vendored libraries exactly as pinned, no way out of the folder, and --no-ui."""

from __future__ import annotations

import hashlib
import re
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

import ember
from ember.server.app import create_app
from ember.server.page import UI
from tests.models.tiny_gguf import write_tiny_gguf


def test_the_page_and_its_files_with_a_strict_policy(served):
    r = httpx.get(served.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp and "object-src 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assets = re.findall(r'(?:src|href)="(ui/[^"]+)"', r.text)
    assert {"ui/app.js", "ui/style.css", "ui/vendor/marked.umd.js", "ui/vendor/purify.min.js"} <= set(assets)
    for a in assets:
        r = httpx.get(f"{served.url}/{a}")
        assert r.status_code == 200 and r.headers["content-security-policy"] == csp, a
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["cache-control"] == "no-cache"
        if a.endswith(".js"):
            assert r.headers["content-type"].startswith("text/javascript"), a  # or browsers refuse modules
    for module in UI.glob("*.js"):  # every import of a module resolves to a shipped file
        for dep in re.findall(r"from '\./([^']+)'", module.read_text()):
            assert (UI / dep).is_file(), f"{module.name} imports {dep}"
    assert httpx.head(served.url + "/").status_code == 200


def test_nothing_outside_the_folder_is_served(served):
    host, port = served.url.removeprefix("http://").split(":")
    for path in ("/ui/../page.py", "/ui/%2e%2e/page.py", "/ui/..%2Fapp.py", "/ui/vendor/../../app.py"):
        with socket.create_connection((host, int(port)), timeout=10) as conn:  # raw: clients tidy up '..'
            conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 404") and b"import" not in answer, (path, answer[:200])


def test_vendored_libraries_are_the_pinned_ones():
    """VENDORED.md (written by tools/vendor_ui.sh) pins each file by hash; an edit by hand shows here."""
    table = (UI / "vendor" / "VENDORED.md").read_text()
    rows = re.findall(r"^\| (\S+\.js) \| (\S+@[\d.]+) \| [^|]+ \| ([0-9a-f]{64}) \|$", table, re.M)
    assert {name for name, _, _ in rows} == {"marked.umd.js", "purify.min.js"}
    for name, _, digest in rows:
        assert hashlib.sha256((UI / "vendor" / name).read_bytes()).hexdigest() == digest, name
    assert (UI / "vendor" / "LICENSE.marked").is_file() and (UI / "vendor" / "LICENSE.dompurify").is_file()


def test_no_ui_serves_the_api_only(tmp_path):
    llm = ember.load(write_tiny_gguf(tmp_path / "tiny.gguf"), dtype="float32")
    with TestClient(create_app(llm, "tiny", ui=False)) as c:
        assert c.get("/").status_code == 404 and c.get("/ui/app.js").status_code == 404
        assert c.get("/v1/models").status_code == 200


def test_a_wheel_carries_the_page_and_the_kernel_sources(tmp_path):
    """`pip install ember` from a wheel gets the page and the C sources its kernels build from
    (pyproject's package-data): build one and look inside."""
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(root),
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=300, cwd=tmp_path)
    names = set(zipfile.ZipFile(next(tmp_path.glob("ember-*.whl"))).namelist())
    want = [p for p in (*UI.rglob("*"), *(root / "ember" / "kernels" / "csrc").glob("*")) if p.is_file()]
    missing = [str(p.relative_to(root)) for p in want if str(p.relative_to(root)) not in names]
    assert not missing, f"not in the wheel: {missing}"
