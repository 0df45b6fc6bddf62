"""The conversation store over HTTP: the same store `ember chat` writes, with strict bodies and 404s."""

from __future__ import annotations

import httpx
import pytest

from ember.store import Store


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_HOME", str(tmp_path))  # the store is opened per call, so this redirects it
    return tmp_path


def test_create_append_list_search_rename_delete(served, home):
    u = served.url + "/v1/conversations"
    r = httpx.post(u, json={"title": "", "model": "smollm2-135m", "settings": {"temperature": 0},
                            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert r.status_code == 200, r.text
    c = r.json()
    assert c["title"] == "What is the capital of France?" and c["message_count"] == 1
    cid = c["id"]
    r = httpx.post(f"{u}/{cid}/messages", json={"messages": [{"role": "assistant", "content": "Paris.",
                                                               "truncated": True}],
                                              "usage": {"prompt_tokens": 30, "completion_tokens": 3}})
    msgs = r.json()["messages"]
    assert msgs[1] == {"role": "assistant", "content": "Paris.", "truncated": True,
                       "usage": {"prompt_tokens": 30, "completion_tokens": 3}}
    other = httpx.post(u, json={"messages": [{"role": "user", "content": "Name a colour"}]}).json()["id"]
    assert [x["id"] for x in httpx.get(u).json()["data"]] == [other, cid]
    assert [x["id"] for x in httpx.get(u, params={"q": "PARIS"}).json()["data"]] == [cid]
    assert httpx.get(u, params={"limit": 1}).json()["data"][0]["id"] == other
    assert httpx.patch(f"{u}/{cid}", json={"title": "France"}).json()["title"] == "France"
    assert Store(home / "conversations.db").get(cid).title == "France"  # what `ember history` sees
    assert httpx.delete(f"{u}/{cid}").json() == {"id": cid, "object": "conversation.deleted", "deleted": True}
    assert httpx.get(f"{u}/{cid}").status_code == 404


def test_bad_requests_are_clear(served, home):
    u = served.url + "/v1/conversations"
    cases = [
        (httpx.post(u, json={"messages": [{"role": "robot", "content": "x"}]}), 400, "messages.0.role"),
        (httpx.post(u, json={"colour": "red"}), 400, "colour"),
        (httpx.post(f"{u}/1/messages", json={"messages": []}), 400, "messages"),
        (httpx.post(f"{u}/999/messages", json={"messages": [{"role": "user", "content": "x"}]}), 404, "id"),
        (httpx.get(f"{u}/abc"), 404, "id"),
        (httpx.patch(f"{u}/999", json={"title": "x"}), 404, "id"),
        (httpx.patch(f"{u}/1", json={"title": ""}), 400, "title"),
        (httpx.patch(f"{u}/1", json={}), 400, None),
        (httpx.post(f"{u}/1/messages", json={"messages": [{"role": "user", "content": "x"}], "keep": -1}), 400,
         "keep"),
        (httpx.post(f"{u}/1/messages", json={"messages": [{"role": "user", "content": "x"}], "keep": 2**63}), 400,
         "keep"),
        (httpx.get(u, params={"limit": "many"}), 400, "limit"),
        (httpx.delete(f"{u}/999"), 404, "id"),
    ]
    for r, status, param in cases:
        assert r.status_code == status and r.json()["error"]["param"] == param, r.text


def test_regenerate_edit_and_system_prompt_rewrite_history_atomically(served, home):
    """What the chat page does to history: keep=N replaces a reply or an edited question in one write;
    PATCH sets settings and the leading system message."""
    u = served.url + "/v1/conversations"
    turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    cid = httpx.post(u, json={"messages": turn * 2}).json()["id"]
    c = httpx.post(f"{u}/{cid}/messages", json={"messages": [{"role": "assistant", "content": "Hey."}],
                                                "keep": 3}).json()  # regenerate the last reply
    assert [m["content"] for m in c["messages"]] == ["Hi", "Hello!", "Hi", "Hey."]
    c = httpx.post(f"{u}/{cid}/messages", json={"messages": [{"role": "user", "content": "Bye"}],
                                                "keep": 2}).json()  # edit the second question
    assert [m["content"] for m in c["messages"]] == ["Hi", "Hello!", "Bye"]
    c = httpx.patch(f"{u}/{cid}", json={"system": "Be brief.", "settings": {"temperature": 0.2}}).json()
    assert c["messages"][0] == {"role": "system", "content": "Be brief."} and c["settings"] == {"temperature": 0.2}
    assert len(c["messages"]) == 4
    c = httpx.patch(f"{u}/{cid}", json={"system": "Be kind."}).json()
    assert [m["content"] for m in c["messages"]] == ["Be kind.", "Hi", "Hello!", "Bye"]
    c = httpx.post(f"{u}/{cid}/messages", json={"messages": [{"role": "assistant", "content": "Ciao"}]}).json()
    assert [m["content"] for m in c["messages"]][-2:] == ["Bye", "Ciao"]
    c = httpx.patch(f"{u}/{cid}", json={"system": ""}).json()
    assert [m["role"] for m in c["messages"]] == ["user", "assistant", "user", "assistant"]
    assert Store(home / "conversations.db").get(cid).messages == c["messages"]
