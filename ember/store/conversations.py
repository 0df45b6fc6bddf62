"""Conversations in SQLite: one file in $EMBER_HOME, shared by `ember chat` and `ember history`.

WAL mode, so readers never block the writer; every write is one transaction (a killed process leaves
the last committed state, never half a message); a busy timeout lets two processes write at once. The
schema is versioned with `PRAGMA user_version`: opening an older store runs the missing migrations, in
order, each in its own transaction.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import EmberError

# Migration i brings a store from version i to i + 1.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE conversations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        title TEXT NOT NULL DEFAULT '',
        model TEXT NOT NULL DEFAULT '',
        settings TEXT NOT NULL DEFAULT '{}',          -- sampling settings, JSON
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        truncated INTEGER NOT NULL DEFAULT 0,         -- a reply the user stopped
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        created REAL NOT NULL,
        UNIQUE (conversation_id, seq)
    );
    """,
    # v2: tool calls of assistant messages (JSON), and listing by last use without a scan
    """
    ALTER TABLE messages ADD COLUMN tool_calls TEXT;
    CREATE INDEX conversations_by_update ON conversations(updated);
    """,
]
VERSION = len(MIGRATIONS)


class ConversationNotFound(EmberError):
    """No conversation with that id (never made, or deleted)."""


@dataclass
class Conversation:
    id: int
    title: str
    model: str
    settings: dict[str, Any]
    created: float
    updated: float
    messages: list[dict[str, Any]] = field(default_factory=list)
    n_messages: int = 0


def default_path() -> Path:
    from ember.hub import ember_home

    return ember_home() / "conversations.db"


class Store:
    def __init__(self, path: str | Path | None = None, *, timeout_s: float = 10.0) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise EmberError(f"conversation store {self.path} cannot be read ({e}): move it aside to start "
                             "a new one") from None

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction, taking the write lock at once (waits up to the timeout for another writer)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > VERSION:
            raise EmberError(f"conversation store {self.path} is version {version}, newer than this ember "
                             f"knows ({VERSION}): upgrade ember")
        for v in range(version, VERSION):
            with self._write() as db:
                if db.execute("PRAGMA user_version").fetchone()[0] != v:
                    continue  # another process migrated it meanwhile
                for stmt in MIGRATIONS[v].split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute(f"PRAGMA user_version = {v + 1}")

    # ---- writing ---------------------------------------------------------------------------------
    def create(self, model: str = "", settings: dict[str, Any] | None = None, title: str = "") -> int:
        now = time.time()
        with self._write() as db:
            cur = db.execute("INSERT INTO conversations (title, model, settings, created, updated) "
                             "VALUES (?, ?, ?, ?, ?)", (title, model, json.dumps(settings or {}), now, now))
            return int(cur.lastrowid)  # type: ignore[arg-type]

    def append(self, cid: int, messages: list[dict[str, Any]], usage: dict[str, int] | None = None,
               keep: int | None = None) -> None:
        """Add messages at the end of a conversation, all or none. usage (prompt_tokens, completion_tokens)
        goes with the last one (a reply). The first user message names an untitled conversation.
        keep: drop every message after the first `keep` first, in the same transaction (a regenerated
        reply, an edited question)."""
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT title FROM conversations WHERE id = ?", (cid,)).fetchone()
            if row is None:
                raise ConversationNotFound(f"conversation {cid} does not exist (deleted meanwhile?)")
            if keep is not None:
                db.execute("DELETE FROM messages WHERE conversation_id = ? AND seq NOT IN (SELECT seq FROM "
                           "messages WHERE conversation_id = ? ORDER BY seq LIMIT ?)", (cid, cid, keep))
            seq = db.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM messages WHERE conversation_id = ?",
                             (cid,)).fetchone()[0]
            for i, m in enumerate(messages):
                u = usage if i == len(messages) - 1 and usage else {}
                calls = m.get("tool_calls")
                db.execute("INSERT INTO messages (conversation_id, seq, role, content, truncated, prompt_tokens, "
                           "completion_tokens, created, tool_calls) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (cid, seq + i, m["role"], m.get("content") or "", int(bool(m.get("truncated"))),
                            u.get("prompt_tokens"), u.get("completion_tokens"), now,
                            None if calls is None else json.dumps(calls)))
            title = row[0] or next((_title(m["content"]) for m in messages if m["role"] == "user"), "")
            db.execute("UPDATE conversations SET updated = ?, title = ? WHERE id = ?", (now, title, cid))

    def rename(self, cid: int, title: str) -> None:
        self.update(cid, title=title)

    def update(self, cid: int, *, title: str | None = None, settings: dict[str, Any] | None = None,
               system: str | None = None) -> None:
        """Change a conversation's title, settings, or system prompt (its first message when that is a
        system message; "" removes it), all in one transaction."""
        with self._write() as db:
            if db.execute("SELECT 1 FROM conversations WHERE id = ?", (cid,)).fetchone() is None:
                raise ConversationNotFound(f"no conversation {cid}: `ember history list` shows them")
            if title is not None:
                db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, cid))
            if settings is not None:
                db.execute("UPDATE conversations SET settings = ? WHERE id = ?", (json.dumps(settings), cid))
            if system is not None:
                self._set_system(db, cid, system if system.strip() else "")

    @staticmethod
    def _set_system(db: sqlite3.Connection, cid: int, text: str) -> None:
        first = db.execute("SELECT seq, role FROM messages WHERE conversation_id = ? ORDER BY seq LIMIT 1",
                           (cid,)).fetchone()
        if first is not None and first[1] == "system":
            if text:
                db.execute("UPDATE messages SET content = ? WHERE conversation_id = ? AND seq = ?",
                           (text, cid, first[0]))
            else:
                db.execute("DELETE FROM messages WHERE conversation_id = ? AND seq = ?", (cid, first[0]))
        elif text:  # seq is only an order: one below the first message puts the prompt before it
            seq = -1 if first is None else first[0] - 1
            db.execute("INSERT INTO messages (conversation_id, seq, role, content, created) "
                       "VALUES (?, ?, 'system', ?, ?)", (cid, seq, text, time.time()))

    def delete(self, cid: int) -> None:
        with self._write() as db:
            if db.execute("DELETE FROM conversations WHERE id = ?", (cid,)).rowcount == 0:
                raise ConversationNotFound(f"no conversation {cid}: `ember history list` shows them")

    # ---- reading ---------------------------------------------------------------------------------
    _LIST = ("SELECT c.id, c.title, c.model, c.settings, c.created, c.updated, "
             "(SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) FROM conversations c ")

    def list(self, limit: int = 50) -> list[Conversation]:
        """Most recently used first."""
        rows = self.db.execute(self._LIST + "ORDER BY c.updated DESC, c.id DESC LIMIT ?", (limit,)).fetchall()
        return [_conversation(r) for r in rows]

    def search(self, text: str, limit: int = 50) -> list[Conversation]:
        """Conversations whose title or any message contains `text` (case-insensitive)."""
        like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self.db.execute(
            self._LIST + "WHERE c.title LIKE ?1 ESCAPE '\\' OR EXISTS (SELECT 1 FROM messages m WHERE "
            "m.conversation_id = c.id AND m.content LIKE ?1 ESCAPE '\\') ORDER BY c.updated DESC LIMIT ?2",
            (like, limit)).fetchall()
        return [_conversation(r) for r in rows]

    def last(self) -> int | None:
        row = self.db.execute("SELECT id FROM conversations ORDER BY updated DESC, id DESC LIMIT 1").fetchone()
        return None if row is None else int(row[0])

    def get(self, cid: int) -> Conversation:
        row = self.db.execute(self._LIST + "WHERE c.id = ?", (cid,)).fetchone()
        if row is None:
            raise ConversationNotFound(f"no conversation {cid}: `ember history list` shows them")
        conv = _conversation(row)
        for role, content, truncated, pt, ct, calls in self.db.execute(
                "SELECT role, content, truncated, prompt_tokens, completion_tokens, tool_calls FROM messages "
                "WHERE conversation_id = ? ORDER BY seq", (cid,)):
            m: dict[str, Any] = {"role": role, "content": content}
            if truncated:
                m["truncated"] = True
            if calls is not None:
                m["tool_calls"] = json.loads(calls)
            if pt is not None or ct is not None:
                m["usage"] = {"prompt_tokens": pt, "completion_tokens": ct}
            conv.messages.append(m)
        return conv


def chat_messages(conv: Conversation) -> list[dict[str, Any]]:
    """A stored conversation as `ember chat`'s JSON history (no usage figures)."""
    return [{k: v for k, v in m.items() if k != "usage"} for m in conv.messages]


def _title(text: str, width: int = 60) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _conversation(row: tuple) -> Conversation:
    cid, title, model, settings, created, updated, n = row
    return Conversation(int(cid), title, model, json.loads(settings or "{}"), created, updated, n_messages=int(n))
