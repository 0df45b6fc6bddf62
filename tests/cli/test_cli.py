"""The `ember` command line, run as a user runs it (subprocesses; the chat REPL through a pseudo-terminal)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

pexpect = pytest.importorskip("pexpect")

EMBER = [sys.executable, "-m", "ember"]


def run(*args: str, timeout: int = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EMBER, *args], capture_output=True, text=True, timeout=timeout)


def test_help_teaches():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("generate", "chat", "pull", "list"):
        assert cmd in r.stdout
    r = run("generate", "--help")
    assert "--max-tokens" in r.stdout and "--temperature" in r.stdout and "--stop" in r.stdout


def test_generate_streams_to_stdout(smollm_gguf):
    r = run("generate", "The capital of France is", "-m", str(smollm_gguf), "--temperature", "0",
            "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tok/s" in r.stderr and "Traceback" not in r.stderr


def test_generate_constrained_outputs(tmp_path, smollm_gguf):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                               "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    r = run("generate", "The largest city of Japan, as JSON:", "--chat", "-m", str(smollm_gguf), "--json-schema",
            str(tmp_path / "s.json"), "--temperature", "1.0", "--seed", "4", "--max-tokens", "60")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"city", "population"} and isinstance(out["population"], int)
    r = run("generate", "Is the sea salty?", "--chat", "-m", str(smollm_gguf), "--choice", "yes,no")
    assert r.returncode == 0 and r.stdout.strip() in ("yes", "no")
    r = run("generate", "A date:", "-m", str(smollm_gguf), "--regex", "20[0-9]{2}-[01][0-9]-[0-3][0-9]")
    assert r.returncode == 0 and len(r.stdout.strip()) == 10
    r = run("generate", "x", "-m", str(smollm_gguf), "--json", "--regex", "a")
    assert r.returncode == 1 and "give one of --json, --regex" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "bad.json").write_text('{"type": "objekt"}')
    r = run("generate", "x", "-m", str(smollm_gguf), "--json-schema", str(tmp_path / "bad.json"))
    assert r.returncode == 1 and "structured.json" in r.stderr and "objekt" in r.stderr
    assert "loaded" not in r.stderr  # refused before the model loads
    assert "Traceback" not in r.stderr


def test_unknown_model_is_a_clear_error():
    r = run("generate", "hi", "-m", "smollm2-13m")
    assert r.returncode == 1
    assert "unknown model" in r.stderr and "smollm2-135m" in r.stderr and "Traceback" not in r.stderr


def test_corrupt_and_truncated_gguf(tmp_path, smollm_gguf):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + os.urandom(1000))
    r = run("generate", "hi", "-m", str(bad))
    assert r.returncode == 1 and "not a GGUF file" in r.stderr and "Traceback" not in r.stderr
    cut = tmp_path / "cut.gguf"
    with open(smollm_gguf, "rb") as f:
        cut.write_bytes(f.read(20_000_000))
    r = run("generate", "hi", "-m", str(cut))
    assert r.returncode == 1 and "truncated" in r.stderr and "Traceback" not in r.stderr
    head = tmp_path / "head.gguf"
    with open(smollm_gguf, "rb") as f:
        head.write_bytes(f.read(300_000))  # cut inside the metadata (the vocabulary)
    r = run("generate", "hi", "-m", str(head))
    assert r.returncode == 1 and ("truncated" in r.stderr or "corrupt" in r.stderr) and "Traceback" not in r.stderr


def test_invalid_option_names_the_field(smollm_gguf):
    r = run("generate", "hi", "-m", str(smollm_gguf), "--top-p", "2")
    assert r.returncode == 1 and "top_p" in r.stderr and "Traceback" not in r.stderr


def test_list_shows_aliases():
    r = run("list")
    assert r.returncode == 0 and "smollm2-135m" in r.stdout and "gemma3-270m" in r.stdout


def _spawn_chat(*args: str):
    env = dict(os.environ, PYTHONUNBUFFERED="1", TERM="dumb")
    child = pexpect.spawn(EMBER[0], [*EMBER[1:], "chat", *args], env=env, encoding="utf-8", timeout=180)
    child.expect_exact("> ")
    return child


def test_chat_repl_through_a_pty(tmp_path, smollm_gguf):
    hist = tmp_path / "history.json"
    child = _spawn_chat("-m", str(smollm_gguf), "-o", str(hist), "--temperature", "0", "--max-tokens", "300")
    child.sendline("What is the capital of France?")
    child.expect("Paris")
    child.expect_exact("> ")
    # a long reply, stopped with Ctrl-C while it streams
    ask = "Write a 500-word essay about the history of the Roman Empire."
    child.sendline(ask)
    child.expect_exact(ask)  # the terminal's echo of what was typed
    child.expect(r"\w+ \w+ \w+ \w+")  # then some words of the reply have streamed
    child.sendintr()
    child.expect_exact("[reply stopped]")
    child.expect_exact("> ")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    msgs = json.loads(hist.read_text())
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert "Paris" in msgs[1]["content"]
    assert msgs[3].get("truncated") is True and msgs[3]["content"]
    assert "truncated" not in msgs[1]

    # reload it with -i (and keep saving with -io) and continue the conversation
    child = _spawn_chat("-m", str(smollm_gguf), "-io", str(hist), "--temperature", "0", "--max-tokens", "40")
    child.sendline("Thanks! And of Germany?")
    child.expect_exact("> ")
    child.sendeof()  # Ctrl-D ends and saves too
    child.expect(pexpect.EOF)
    child.close()
    msgs2 = json.loads(hist.read_text())
    assert len(msgs2) == 6 and msgs2[:4] == msgs and msgs2[4]["content"] == "Thanks! And of Germany?"


def test_chat_ctrl_c_at_empty_prompt_exits_and_saves(tmp_path, smollm_gguf):
    hist = tmp_path / "h.json"
    child = _spawn_chat("-m", str(smollm_gguf), "-o", str(hist), "--system", "Be brief.")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert json.loads(hist.read_text()) == [{"role": "system", "content": "Be brief."}]


def test_chat_drops_oldest_turns_when_context_fills(tmp_path, smollm_gguf):
    hist = tmp_path / "long.json"
    old = []
    for i in range(6):
        old += [{"role": "user", "content": f"Question {i}: " + "tell me more " * 20},
                {"role": "assistant", "content": "Sure. " * 30}]
    hist.write_text(json.dumps(old))
    child = _spawn_chat("-m", str(smollm_gguf), "-io", str(hist), "--max-model-len", "400",
                        "--temperature", "0", "--max-tokens", "16")
    child.sendline("Last question?")
    child.expect_exact("context full: dropped")
    child.expect_exact("> ")
    child.sendline("bye")
    child.expect(pexpect.EOF)
    msgs = json.loads(hist.read_text())
    assert msgs[-2]["content"] == "Last question?" and len(msgs) < len(old) + 2


def test_bench_runs_and_names_bad_peers(smollm_gguf):
    r = run("bench", "-m", str(smollm_gguf), "--trials", "1", "--gen-len", "4", "--prompt-len", "16", "--threads", "1")
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("| ember"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) > 0 and float(cells[2]) > 0 and float(cells[3]) > 0 and float(cells[5]) > 0
    line = next(ln for ln in r.stderr.splitlines() if "machine read bandwidth" in ln)
    read_gbs, share = float(line.split("bandwidth ")[1].split(" GB/s")[0]), line.rsplit("ember ", 1)[1]
    assert read_gbs > 1 and share.endswith("%")
    from ember import kernels

    assert f"ember's kernels: {kernels.isa()}" in r.stderr  # which vector code ran: AVX512, AVX2, plain C, off
    assert abs(float(share[:-1]) / 100 * read_gbs - float(cells[4])) < 0.1 + 0.02 * float(cells[4])  # GB/s / read
    r = run("bench", "-m", str(smollm_gguf), "--vs", "vllm")
    assert r.returncode == 1 and "unknown peer" in r.stderr and "Traceback" not in r.stderr


def test_bench_concurrency_table(smollm_gguf):
    r = run("bench", "-m", str(smollm_gguf), "--concurrency", "1", "--concurrency", "3", "--gen-len", "4",
            "--prompt-len", "8", "--threads", "1")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ember |")]
    assert len(rows) == 2
    for row in rows:
        cells = [float(c) for c in row.strip("|").split("|")[1:]]
        assert cells[1] > 0 and cells[2] > 0 and cells[6] > 0  # tok/s, TTFT, RSS
        assert 0 < cells[4] <= cells[5]  # inter-token p50 <= p99


FAKE_LLAMA_SERVER = """#!{python}
# stands in for llama.cpp's llama-server: checks its flags and the /completion request, streams tokens
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
a = sys.argv
flags = {{a[i]: a[i + 1] for i in range(1, len(a) - 1) if a[i].startswith("-")}}
assert flags["-m"].endswith(".gguf") and int(flags["-np"]) >= 1 and int(flags["-t"]) >= 1
assert int(flags["-c"]) >= int(flags["-np"]) * 12, flags  # every slot holds prompt + generation

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b'{{"status": "ok"}}'
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/completion" and req["stream"] and req["ignore_eos"], req
        assert all(isinstance(t, int) for t in req["prompt"]) and req["temperature"] == 0
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for i in range(req["n_predict"]):
            last = i == req["n_predict"] - 1
            self.wfile.write(("data: " + json.dumps({{"content": "x", "tokens": [i], "stop": last}}) + "\\n\\n").encode())
            self.wfile.flush()
    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(flags["--port"])), H).serve_forever()
"""


def test_bench_concurrency_drives_llama_server(smollm_gguf, tmp_path):
    """--concurrency --vs llama.cpp starts llama-server (here a stand-in that checks the flags and the
    request), sends the same load and reports its row; without the binary, a clear error."""
    fake = tmp_path / "llama-server"
    fake.write_text(FAKE_LLAMA_SERVER.format(python=sys.executable))
    fake.chmod(0o755)
    args = ("bench", "-m", str(smollm_gguf), "--concurrency", "2", "--gen-len", "5", "--prompt-len", "6",
            "--threads", "1", "--vs", "llama.cpp")
    r = subprocess.run([*EMBER, *args], capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, LLAMA_SERVER=str(fake)))
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("| llama.cpp server |"))
    cells = [float(c) for c in row.strip("|").split("|")[1:]]
    assert cells[0] == 2 and cells[1] > 0 and cells[2] > 0  # concurrency, tok/s, TTFT
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_SERVER"}
    env["PATH"] = os.path.dirname(sys.executable)  # python, but no llama-server
    r = subprocess.run([*EMBER, *args], capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 1 and "llama-server" in r.stderr and "Traceback" not in r.stderr


def test_serve_answers_and_refuses_a_busy_port(smollm_gguf):
    import socket
    import time

    import httpx

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = run("serve", "-m", str(smollm_gguf), "--port", str(busy.getsockname()[1]))
        assert r.returncode == 1 and "cannot listen" in r.stderr and "Traceback" not in r.stderr
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
    r = run("serve", "-m", str(smollm_gguf), "--port", str(port), "--max-num-seqs", "100",
            "--max-num-batched-tokens", "50")
    assert r.returncode == 1 and "max_num_batched_tokens=50 is below max_num_seqs=100" in r.stderr
    assert "Traceback" not in r.stderr
    proc = subprocess.Popen([sys.executable, "-m", "ember", "serve", "-m", str(smollm_gguf), "--port", str(port),
                             "--max-num-seqs", "4", "--max-num-batched-tokens", "32"], stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.25)
        body = {"model": smollm_gguf.stem, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 12, "temperature": 0}
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
        assert "Paris" in reply["choices"][0]["message"]["content"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


FAKE_LLAMA_BENCH = """#!{python}
# stands in for llama.cpp's llama-bench: checks its flags, prints its JSON report
import json, sys
a = sys.argv
flags = {{a[i]: a[i + 1] for i in range(1, len(a) - 1) if a[i].startswith("-")}}
assert flags["-m"].endswith(".gguf") and flags["-o"] == "json" and int(flags["-t"]) >= 1, flags
p, n = int(flags["-p"]), int(flags["-n"])
print(json.dumps([{{"n_prompt": p, "n_gen": 0, "avg_ts": {pp}}}, {{"n_prompt": 0, "n_gen": n, "avg_ts": {tg}}}]))
"""


def test_bench_vs_llama_bench_binary(smollm_gguf, tmp_path):
    """Without llama-cpp-python, --vs llama.cpp runs llama.cpp's llama-bench (here stand-ins) and reads its
    JSON report; $LLAMA_BENCH=A:B measures two builds, and ember is compared with the faster per figure."""
    fakes = []
    for build, pp, tg in (("native", 123.5, 45.25), ("avx2", 80.0, 60.0)):
        fake = tmp_path / build / "bin" / "llama-bench"
        fake.parent.mkdir(parents=True)
        fake.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable, pp=pp, tg=tg))
        fake.chmod(0o755)
        fakes.append(str(fake))
    r = subprocess.run([*EMBER, "bench", "-m", str(smollm_gguf), "--trials", "1", "--gen-len", "4", "--prompt-len",
                        "8", "--threads", "1", "--vs", "llama.cpp"], capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, LLAMA_BENCH=os.pathsep.join(fakes)))
    assert r.returncode == 0, r.stderr
    rows = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in r.stdout.splitlines()
                              if line.startswith("| "))}
    native, avx2, ember = rows["llama.cpp native"], rows["llama.cpp avx2"], rows["ember"]
    assert native[1] == "n/a" and float(native[2]) == 124 and float(native[3]) == 45.2 and float(native[5]) > 0
    assert float(avx2[2]) == 80 and float(avx2[3]) == 60 and fakes[1] in avx2[7]
    best = next(line for line in r.stderr.splitlines() if "fastest llama.cpp build" in line)
    m = re.search(r"prefill ([\d.]+)x \(llama.cpp native\), decode ([\d.]+)x \(llama.cpp avx2\)", best)
    assert m, best  # each figure against its own fastest build; the table's figures are rounded
    assert float(m[1]) == pytest.approx(float(ember[2]) / 123.5, rel=0.01, abs=0.01)
    assert float(m[2]) == pytest.approx(float(ember[3]) / 60, rel=0.01, abs=0.01)
    r = subprocess.run([*EMBER, "bench", "-m", str(smollm_gguf), "--trials", "1", "--gen-len", "4", "--vs", "llama.cpp",
                        "--threads", "1"], capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, LLAMA_BENCH=str(tmp_path / "missing")))
    assert r.returncode == 1 and "cannot run" in r.stderr and "Traceback" not in r.stderr


def test_serve_replica_flags_are_checked(tmp_path, smollm_gguf):
    """Ray Serve flags: a missing Ray says how to install it; bad combinations are one-line errors."""
    fake = tmp_path / "ray"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('no ray here')\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    r = subprocess.run([*EMBER, "serve", "-m", str(smollm_gguf), "--replicas", "2", "--port", port],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert r.returncode == 1 and "pip install 'ember[ray]'" in r.stderr and "Traceback" not in r.stderr
    r = run("serve", "-m", str(smollm_gguf), "--replica-cpus", "2", "--port", port)
    assert r.returncode == 1 and "add --replicas N" in r.stderr and "Traceback" not in r.stderr
    pytest.importorskip("ray.serve")
    r = run("serve", "-m", str(smollm_gguf), "--replicas", "3", "--max-replicas", "2", "--port", port)
    assert r.returncode == 1 and "--max-replicas 2 is below --replicas 3" in r.stderr


def test_chat_turns_are_stored_and_history_commands_work(tmp_path, smollm_gguf):
    """`ember chat` writes each turn to the store; `--resume` continues the last conversation (or one by
    id); `ember history` lists, shows, searches, exports and removes them: all as subprocesses."""
    env = dict(os.environ, EMBER_HOME=str(tmp_path / "home"))

    def ember(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([*EMBER, *args], input=stdin, capture_output=True, text=True, timeout=180, env=env)

    chat = ("chat", "-m", str(smollm_gguf), "--temperature", "0", "--max-tokens", "12")
    r = ember(*chat, stdin="What is the capital of France?\nexit\n")
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr
    r = ember(*chat, "--resume", stdin="And of Italy?\nexit\n")  # a bare --resume: the last conversation
    assert r.returncode == 0 and "1 earlier turns" in r.stderr and "Rome" in r.stdout, r.stderr
    r = ember(*chat, stdin="Name a colour.\nexit\n")  # a new conversation
    r = ember("history", "list")
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 3 and lines[1].split()[0] == "2" and lines[2].split()[0] == "1"
    assert "4  SmolLM2-135M-Instruct.Q4_1.gguf   What is the capital of France?" in lines[2]
    shown = ember("history", "show", "1").stdout
    assert shown.index("France") < shown.index("Paris") < shown.index("Italy") < shown.index("Rome")
    assert [ln.split()[0] for ln in ember("history", "search", "ITALY").stdout.splitlines()[1:]] == ["1"]
    ember("history", "export", "1", "-o", str(tmp_path / "one.json"))
    msgs = json.loads((tmp_path / "one.json").read_text())
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"] and "Rome" in msgs[3]["content"]
    r = ember(*chat, "-i", str(tmp_path / "one.json"), stdin="exit\n")  # the exported JSON loads back
    assert r.returncode == 0 and "2 earlier turns" in r.stderr
    r = ember(*chat, "--resume", "1", stdin="Thanks!\nexit\n")
    assert r.returncode == 0 and ember("history", "show", "1").stdout.count("\nuser:") == 3
    assert ember("history", "rm", "2").returncode == 0
    assert [ln.split()[0] for ln in ember("history", "list").stdout.splitlines()[1:]] == ["1"]
    for args in (("history", "show", "2"), (*chat, "--resume", "x"), (*chat, "--resume", "-i", "f.json")):
        r = ember(*args)
        assert r.returncode in (1, 2) and "Traceback" not in r.stderr, r.stderr


def test_chat_goes_on_when_the_store_cannot_be_read(tmp_path, smollm_gguf):
    home = tmp_path / "home"
    home.mkdir()
    (home / "conversations.db").write_bytes(b"not a database" * 100)
    env = dict(os.environ, EMBER_HOME=str(home))
    args = [*EMBER, "chat", "-m", str(smollm_gguf), "--temperature", "0", "--max-tokens", "4"]
    r = subprocess.run(args, input="Hi\nexit\n", capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0 and "this chat is not stored" in r.stderr and "history saved to" in r.stderr, r.stderr
    r = subprocess.run([*args, "--resume"], input="exit\n", capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 1 and "move it aside" in r.stderr and "Traceback" not in r.stderr
