"""The conversation store: round trips, search, two processes writing at once, a process killed in the
middle of a write, a store of an older schema version, and stores ember cannot read."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

import pytest

from ember.errors import EmberError
from ember.store import Store, chat_messages
from ember.store.conversations import MIGRATIONS, VERSION


def test_round_trip_list_search_rename_delete(tmp_path):
    s = Store(tmp_path / "c.db")
    a = s.create("smollm2-135m", {"temperature": 0.7})
    s.append(a, [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 100% of 5_000?"}])
    s.append(a, [{"role": "assistant", "content": "5000", "truncated": True,
                  "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
             usage={"prompt_tokens": 20, "completion_tokens": 3})
    time.sleep(0.01)
    b = s.create("gemma3-270m")
    s.append(b, [{"role": "user", "content": "Hello there " * 10}])
    conv = s.get(a)
    assert conv.title == "What is 100% of 5_000?" and conv.model == "smollm2-135m"
    assert conv.settings == {"temperature": 0.7} and len(conv.messages) == 3
    assert conv.messages[2]["truncated"] and conv.messages[2]["usage"] == {"prompt_tokens": 20, "completion_tokens": 3}
    assert conv.messages[2]["tool_calls"][0]["function"]["name"] == "f"
    assert chat_messages(conv)[2] == {"role": "assistant", "content": "5000", "truncated": True,
                                      "tool_calls": conv.messages[2]["tool_calls"]}
    assert [c.id for c in s.list()] == [b, a] and s.last() == b  # most recently used first
    assert s.get(b).title.endswith("…") and len(s.get(b).title) == 60
    assert [c.id for c in s.search("100%")] == [a] and [c.id for c in s.search("5_0")] == [a]
    assert s.search("10%") == [] and s.search("5x0") == []  # % and _ are literal
    assert [c.id for c in s.search("HELLO")] == [b]
    s.rename(a, "Percentages")
    assert s.get(a).title == "Percentages"
    s.delete(a)
    assert [c.id for c in s.list()] == [b]
    assert s.db.execute("SELECT COUNT(*) FROM messages WHERE conversation_id = ?", (a,)).fetchone()[0] == 0
    for bad in (lambda: s.get(a), lambda: s.delete(a), lambda: s.rename(a, "x"),
                lambda: s.append(a, [{"role": "user", "content": "x"}])):
        with pytest.raises(EmberError, match=f"conversation {a}"):
            bad()


WRITER = """
import sys
from ember.store import Store
s = Store(sys.argv[1])
shared, tag = int(sys.argv[2]), sys.argv[3]
own = s.create("m")
for i in range(150):
    s.append(own, [{"role": "user", "content": f"{tag} {i}"}, {"role": "assistant", "content": "ok"}])
    s.append(shared, [{"role": "user", "content": f"{tag} shared {i}"}])
"""


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path = tmp_path / "c.db"
    shared = Store(path).create("m")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(shared), tag]) for tag in "AB"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    s = Store(path)
    convs = {c.id: c for c in s.list()}
    assert len(convs) == 3 and sorted(c.n_messages for c in convs.values()) == [300, 300, 300]
    texts = [m["content"] for m in s.get(shared).messages]
    for tag in "AB":  # each writer's messages all there, in its own order
        assert [t for t in texts if t.startswith(tag)] == [f"{tag} shared {i}" for i in range(150)]
    seqs = [r[0] for r in s.db.execute("SELECT seq FROM messages WHERE conversation_id = ? ORDER BY seq", (shared,))]
    assert seqs == list(range(300))


KILLED = """
import sys, time
from ember.store import Store
s = Store(sys.argv[1])
cid = s.last()
s.db.execute("BEGIN IMMEDIATE")
for i in range(1000):
    s.db.execute("INSERT INTO messages (conversation_id, seq, role, content, created) VALUES (?, ?, 'user', 'x', 0)",
                 (cid, 100 + i))
print("inserted", flush=True)
time.sleep(60)
"""


def test_a_process_killed_mid_write_leaves_the_last_commit(tmp_path):
    path = tmp_path / "c.db"
    s = Store(path)
    cid = s.create("m")
    s.append(cid, [{"role": "user", "content": "kept"}])
    p = subprocess.Popen([sys.executable, "-c", KILLED, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "inserted"  # mid-transaction, holding the write lock
    p.kill()
    p.wait(timeout=30)
    s2 = Store(path)
    assert s2.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert [m["content"] for m in s2.get(cid).messages] == ["kept"]
    s2.append(cid, [{"role": "assistant", "content": "and writable"}])  # the lock went with the process
    assert len(Store(path).get(cid).messages) == 2


def test_an_older_store_migrates_and_keeps_its_data(tmp_path):
    path = tmp_path / "c.db"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0])  # a store written by the first schema version
    db.execute("INSERT INTO conversations (title, model, created, updated) VALUES ('old', 'm', 1, 1)")
    db.execute("INSERT INTO messages (conversation_id, seq, role, content, created) VALUES (1, 0, 'user', 'hi', 1)")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    s = Store(path)
    assert s.db.execute("PRAGMA user_version").fetchone()[0] == VERSION == 2
    assert s.get(1).title == "old" and s.get(1).messages == [{"role": "user", "content": "hi"}]
    s.append(1, [{"role": "assistant", "content": "hey", "tool_calls": []}])  # v2's column
    assert s.get(1).messages[1]["tool_calls"] == []
    assert Store(path).get(1).n_messages == 2  # opening again migrates nothing


def test_stores_ember_cannot_read_are_clear_errors(tmp_path):
    newer = tmp_path / "newer.db"
    db = sqlite3.connect(newer)
    db.execute(f"PRAGMA user_version = {VERSION + 1}")
    db.close()
    with pytest.raises(EmberError, match="newer than this ember"):
        Store(newer)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(EmberError, match="move it aside"):
        Store(junk)
