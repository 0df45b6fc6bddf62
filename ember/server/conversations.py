"""The conversation store over HTTP (`ember serve`), for the chat page and any client that wants history:

    GET    /v1/conversations?q=TEXT&limit=N      list (most recent first), or search titles and messages
    POST   /v1/conversations                     {"title"?, "model"?, "settings"?, "messages"?} -> created
    GET    /v1/conversations/{id}                one, with its messages
    POST   /v1/conversations/{id}/messages       {"messages": [...], "usage"?, "keep"?} appended, all or none;
                                                 keep=N drops the messages after the first N first
    PATCH  /v1/conversations/{id}                {"title"?, "settings"?, "system"?} changed (system: the
                                                 leading system message; "" removes it)
    DELETE /v1/conversations/{id}

The same store file as `ember chat` and `ember history` ($EMBER_HOME/conversations.db). Each call opens it
on a worker thread: SQLite may wait for another process's write, and the event loop must not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, model_validator

from ember.errors import EmberError
from ember.server.body import APIError, Strict
from ember.store import Conversation, ConversationNotFound, Store


class StoredMessage(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    truncated: bool = False
    tool_calls: list[dict[str, Any]] | None = None

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude_defaults=True) | {"role": self.role, "content": self.content}


class Usage(Strict):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)


class NewConversation(Strict):
    title: str = ""
    model: str = ""
    settings: dict[str, Any] = Field(default_factory=dict)
    messages: list[StoredMessage] = Field(default_factory=list)


class NewMessages(Strict):
    messages: list[StoredMessage] = Field(min_length=1)
    usage: Usage | None = None
    keep: int | None = Field(None, ge=0, le=2**31)


class Update(Strict):
    title: str | None = Field(None, min_length=1, max_length=200)
    settings: dict[str, Any] | None = None
    system: str | None = None

    @model_validator(mode="after")
    def _something(self) -> Update:
        if self.title is None and self.settings is None and self.system is None:
            raise ValueError("give at least one of title, settings, system")
        return self


def as_json(c: Conversation, with_messages: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"id": c.id, "object": "conversation", "title": c.title, "model": c.model,
                           "settings": c.settings, "created": c.created, "updated": c.updated,
                           "message_count": c.n_messages}
    if with_messages:
        out["messages"] = c.messages
    return out


async def _run(fn: Callable[[Store], Any]) -> Any:
    """fn on a store of its own, on a worker thread; a missing conversation is a 404."""

    def call() -> Any:
        store = Store()
        try:
            return fn(store)
        finally:
            store.close()

    try:
        return await asyncio.to_thread(call)
    except ConversationNotFound as e:
        raise APIError(404, str(e), "id", "not_found") from None
    except EmberError as e:  # a store this ember cannot read
        raise APIError(500, str(e), kind="server_error") from None


def _id(raw: str) -> int:
    if not raw.isdigit():
        raise APIError(404, f"no conversation {raw!r}", "id", "not_found")
    return int(raw)


async def list_(q: str | None, limit_raw: str) -> dict[str, Any]:
    """limit_raw: the query's text, checked here."""
    if not limit_raw.isdigit():
        raise APIError(400, f"limit={limit_raw!r}: give a whole number", "limit")
    limit = int(limit_raw)
    if not 1 <= limit <= 1000:
        raise APIError(400, "limit: give 1..1000", "limit")
    rows = await _run(lambda s: s.search(q, limit) if q else s.list(limit))
    return {"object": "list", "data": [as_json(c) for c in rows]}


async def create(body: NewConversation) -> dict[str, Any]:
    def fn(s: Store) -> Conversation:
        cid = s.create(body.model, body.settings, body.title)
        if body.messages:
            s.append(cid, [m.as_dict() for m in body.messages])
        return s.get(cid)

    return as_json(await _run(fn), with_messages=True)


async def get(raw_id: str) -> dict[str, Any]:
    cid = _id(raw_id)
    return as_json(await _run(lambda s: s.get(cid)), with_messages=True)


async def append(raw_id: str, body: NewMessages) -> dict[str, Any]:
    cid = _id(raw_id)

    def fn(s: Store) -> Conversation:
        s.append(cid, [m.as_dict() for m in body.messages], body.usage.model_dump() if body.usage else None,
                 keep=body.keep)
        return s.get(cid)

    return as_json(await _run(fn), with_messages=True)


async def update(raw_id: str, body: Update) -> dict[str, Any]:
    cid = _id(raw_id)

    def fn(s: Store) -> Conversation:
        s.update(cid, title=body.title, settings=body.settings, system=body.system)
        return s.get(cid)

    return as_json(await _run(fn), with_messages=True)


async def delete(raw_id: str) -> dict[str, Any]:
    cid = _id(raw_id)
    await _run(lambda s: s.delete(cid))
    return {"id": cid, "object": "conversation.deleted", "deleted": True}
