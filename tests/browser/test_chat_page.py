"""The chat page in a real headless Chromium against a real `ember serve` of SmolLM2: a streamed answer, the
stop button and Esc (the server's running count back to 0), regenerate, reload and continue, edit-and-resend,
rename, delete, model output that tries to run script, a phone-sized screen, and an API key. The store is
checked through its HTTP API, and greedy answers against the same request sent by plain HTTP."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.browser.conftest import MODEL, EmberServer, screenshot, wait_for

QUESTION = "What is the capital of France?"
pytestmark = pytest.mark.browser


def by(css: str):
    from selenium.webdriver.common.by import By

    return By.CSS_SELECTOR, css


def keys():
    from selenium.webdriver.common.keys import Keys

    return Keys


def js(d, script: str, *args):
    return d.execute_script(script, *args)


def open_page(d, url: str, fresh: bool = True) -> None:
    """Load the page; fresh: without the settings an earlier test left in this browser (each test sets its own)."""
    d.get(url)
    if fresh:
        js(d, "localStorage.removeItem('ember.lastSettings')")
        d.refresh()
    wait_for(lambda: js(d, "return document.getElementById('model').textContent") == MODEL, 20,
             "the page to name the model")


def set_field(d, field: str, value: str) -> None:
    if not d.find_element(*by("#settings")).is_displayed():
        d.find_element(*by("#open-settings")).click()
    el = d.find_element(*by(f"#{field}"))
    el.clear()
    el.send_keys(value, keys().TAB)  # `change` fires as the field loses focus


WATCH = """window.__seen = [];
new MutationObserver(() => {
  const body = document.querySelector('#messages article.streaming .body');
  if (body && body.textContent && window.__seen.at(-1) !== body.textContent) window.__seen.push(body.textContent);
}).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});"""


def ask(d, text: str) -> None:
    """Send a question; an observer in the page records each text its reply shows while it streams."""
    n = len(replies(d))
    js(d, WATCH)
    box = d.find_element(*by("#prompt"))
    box.send_keys(text, keys().ENTER)
    wait_for(lambda: len(replies(d)) > n, 10, "the reply to start")


def replies(d) -> list:
    return d.find_elements(*by("#messages article.assistant"))


def reply_text(d) -> str:
    return js(d, "const r = [...document.querySelectorAll('#messages article.assistant .body')].pop();"
                 "return r ? r.textContent : ''")


def streaming(d) -> bool:
    return js(d, "return !!document.querySelector('#messages article.streaming')")


def follow_reply(d, timeout: float = 90) -> list[str]:
    """The texts the reply showed while it streamed, then its final text."""
    wait_for(lambda: not streaming(d), timeout, "the reply to finish")
    return [*js(d, "return window.__seen"), reply_text(d)]


def conversation_id(d) -> int:
    m = re.fullmatch(r"#c=(\d+)", js(d, "return location.hash"))
    assert m, "the page names the open conversation in its address"
    return int(m.group(1))


def stored(server: EmberServer, cid: int) -> dict:
    r = httpx.get(f"{server.url}/v1/conversations/{cid}", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def greedy(server: EmberServer, messages: list[dict], max_tokens: int) -> str:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": messages, "temperature": 0, "max_tokens": max_tokens})
    return r.json()["choices"][0]["message"]["content"]


def running(server: EmberServer) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r"^ember_requests_running(?:\{[^}]*\})? (\S+)$", text, re.M))


def words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", text)


def ask_greedy(d, server: EmberServer, question: str, max_tokens: int) -> list[str]:
    """A fresh page, greedy settings, one question: the texts its reply showed (follow_reply)."""
    open_page(d, server.url + "/")
    set_field(d, "temperature", "0")
    set_field(d, "max_tokens", str(max_tokens))
    ask(d, question)
    return follow_reply(d)


def test_a_question_streams_its_answer_and_the_store_keeps_it(browser, server):
    d = browser
    seen = ask_greedy(d, server, QUESTION, 48)
    assert len(set(seen)) >= 3, f"the answer came in one piece, not streamed: {seen}"  # parts shown first
    assert all(words(seen[-1])[:len(words(s)) - 1] == words(s)[:-1] for s in seen[:-1])  # it grew
    want = greedy(server, [{"role": "user", "content": QUESTION}], 48)
    conv = stored(server, conversation_id(d))
    assert [(m["role"], m["content"]) for m in conv["messages"]] == [("user", QUESTION), ("assistant", want)]
    assert conv["settings"] == {"temperature": 0, "max_tokens": 48} and conv["model"] == MODEL
    assert conv["messages"][1]["usage"]["completion_tokens"] > 1
    assert words(seen[-1]) == words(want)  # Markdown rendered, the same words
    meta = replies(d)[-1].find_element(*by(".meta")).text
    assert re.fullmatch(r"(cut at the token limit · )?\d+ tokens · [\d.]+ tok/s · prompt \d+( \(\d+ cached\))? "
                        r"· first token \d+ ms", meta), meta


def test_stop_and_esc_cancel_the_reply_on_the_server(browser, server):
    d = browser
    open_page(d, server.url + "/")
    set_field(d, "temperature", "0")
    set_field(d, "max_tokens", "1500")
    ask(d, "Count from 1 to 400, one number per line.")

    def long_enough_and_running() -> bool:
        return len(reply_text(d)) > 30 and running(server) == 1

    wait_for(long_enough_and_running, 30, "a long reply under way")
    stop = d.find_element(*by("#stop"))
    assert stop.is_displayed() and not d.find_element(*by("#send")).is_displayed()
    stop.click()
    wait_for(lambda: not streaming(d), 10, "the stopped reply to end")
    wait_for(lambda: running(server) == 0, 5, "the server to stop generating")
    cid = conversation_id(d)
    reply = wait_for(lambda: len(stored(server, cid)["messages"]) == 2 and stored(server, cid)["messages"][1],
                     5, "the stopped reply in the store")
    assert reply["truncated"] is True and 0 < reply["usage"]["completion_tokens"] < 1500
    assert words(reply["content"]) == words(reply_text(d))
    assert replies(d)[-1].find_element(*by(".meta")).text.startswith("stopped ·")
    assert d.find_element(*by("#send")).is_displayed()

    # Regenerate the stopped reply, then stop the new one with Esc: it replaces the first in the store
    before = stored(server, cid)["updated"]
    replies(d)[-1].find_element(*by("button[aria-label='Regenerate the last reply']")).click()
    wait_for(lambda: streaming(d) and long_enough_and_running(), 30, "the regenerated reply under way")
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(d).send_keys(keys().ESCAPE).perform()
    wait_for(lambda: not streaming(d), 10, "Esc to stop the reply")
    wait_for(lambda: running(server) == 0, 5, "the server to stop generating")
    conv = wait_for(lambda: (c := stored(server, cid))["updated"] > before and c, 5, "the regenerated reply saved")
    assert len(conv["messages"]) == 2 and conv["messages"][1]["truncated"] is True
    assert words(conv["messages"][1]["content"]) == words(reply_text(d))


def test_reload_continue_edit_rename_and_delete(browser, server):
    d = browser
    httpx.post(server.url + "/v1/conversations", json={"messages": [{"role": "user", "content": "Name a tree."}]})
    ask_greedy(d, server, QUESTION, 48)
    cid = conversation_id(d)
    open_page(d, server.url + "/")  # reloaded: no conversation open, no settings remembered
    assert d.find_element(*by("#title")).text == "New chat"
    item = wait_for(lambda: d.find_elements(*by(f"#conversations li[data-id='{cid}']")), 10,
                    "the conversation in the list")[0]
    assert item.find_element(*by(".name")).text == QUESTION
    item.find_element(*by("button.open")).click()
    wait_for(lambda: len(d.find_elements(*by("#messages article"))) == 2, 10, "its messages")
    assert conversation_id(d) == cid
    first = stored(server, cid)["messages"]
    assert d.find_element(*by("#max_tokens")).get_attribute("value") == "48"  # its own settings came back

    ask(d, "And of Germany?")
    follow_reply(d)
    history = [{"role": m["role"], "content": m["content"]} for m in first]
    want = greedy(server, history + [{"role": "user", "content": "And of Germany?"}], 48)
    msgs = stored(server, cid)["messages"]
    assert [m["content"] for m in msgs] == [QUESTION, first[1]["content"], "And of Germany?", want]
    assert "cached" in replies(d)[-1].find_element(*by(".meta")).text  # the first turn's prefix was reused

    # Search as you type: the list shows what the store finds, then everything again
    def listed() -> list[int]:  # read in one go: the list is rebuilt under us
        return js(d, "return [...document.querySelectorAll('#conversations li.conv')].map((li) => Number(li.dataset.id))")

    everything = listed()
    search = d.find_element(*by("#search"))
    search.send_keys("germany")
    found = [c["id"] for c in httpx.get(server.url + "/v1/conversations", params={"q": "germany"}).json()["data"]]
    assert cid in found and len(found) < len(everything)  # the tree question does not mention it
    wait_for(lambda: listed() == found, 5, "the list to show the search's conversations")
    search.send_keys(keys().CONTROL, "a", keys().BACKSPACE)
    wait_for(lambda: listed() == everything, 5, "the whole list again")
    print("screenshot:", screenshot(d, "chat-page.png"))

    # Edit the second question and send it again: the turn after it is replaced
    d.find_element(*by("#messages article[data-index='2'] .actions button")).click()
    area = d.find_element(*by("#messages form.edit textarea"))
    area.clear()
    area.send_keys("And of Italy?")
    d.find_element(*by("#messages form.edit button[type='submit']")).click()
    follow_reply(d)
    want = greedy(server, history + [{"role": "user", "content": "And of Italy?"}], 48)
    msgs = stored(server, cid)["messages"]
    assert [m["content"] for m in msgs] == [QUESTION, first[1]["content"], "And of Italy?", want]

    # Rename it in the list, then delete it
    li = d.find_element(*by(f"#conversations li[data-id='{cid}']"))
    li.find_element(*by("button.rename")).click()
    field = d.find_element(*by(f"#conversations li[data-id='{cid}'] input"))
    field.send_keys(keys().CONTROL, "a")
    field.send_keys("Capitals", keys().ENTER)
    wait_for(lambda: stored(server, cid)["title"] == "Capitals", 5, "the new title in the store")
    wait_for(lambda: d.find_element(*by(f"#conversations li[data-id='{cid}'] .name")).text == "Capitals", 5,
             "the new title in the list")
    assert d.find_element(*by("#title")).text == "Capitals"
    d.find_element(*by(f"#conversations li[data-id='{cid}'] button.delete")).click()
    d.switch_to.alert.accept()  # "Delete “Capitals”? This cannot be undone."
    wait_for(lambda: not d.find_elements(*by(f"#conversations li[data-id='{cid}']")), 5, "it to leave the list")
    assert httpx.get(f"{server.url}/v1/conversations/{cid}").status_code == 404
    assert d.find_element(*by("#title")).text == "New chat" and not replies(d)


ATTACKS = ("<script>window.__pwned = 'script'</script>\n\n"
           "An image: <img src=x onerror=\"window.__pwned = 'img'\">\n\n"
           "[a link](javascript:window.__pwned='link') and <a href=\"javascript:void(window.__pwned='a')\">another</a>\n\n"
           "```html\n<b onclick=\"window.__pwned='code'\">bold?</b>\n```\n\n**still Markdown**")


def test_markup_in_a_reply_is_shown_as_text_and_runs_nothing(browser, server):
    d = browser
    conv = httpx.post(server.url + "/v1/conversations", json={"messages": [
        {"role": "user", "content": "<img src=x onerror=\"window.__pwned = 'user'\"> say it"},
        {"role": "assistant", "content": ATTACKS}]}).json()
    open_page(d, f"{server.url}/#c={conv['id']}")
    wait_for(lambda: len(replies(d)) == 1, 10, "the stored reply")
    body = replies(d)[0].find_element(*by(".body"))
    text = body.text
    assert "<script>window.__pwned = 'script'</script>" in text
    assert "<img src=x onerror=\"window.__pwned = 'img'\">" in text
    assert "<b onclick=\"window.__pwned='code'\">bold?</b>" in text  # the code block, as written
    assert body.find_elements(*by("strong"))[0].text == "still Markdown"  # Markdown still renders
    assert not body.find_elements(*by("script, img, [onerror], [onclick]"))
    assert all(not (a.get_attribute("href") or "").startswith("javascript:") for a in body.find_elements(*by("a")))
    for a in body.find_elements(*by("a")):
        a.click()  # a link that survived could only navigate elsewhere, never run here
    user = d.find_elements(*by("#messages article.user .body"))[0]
    assert user.text.startswith("<img src=x") and not user.find_elements(*by("img"))
    assert js(d, "return window.__pwned === undefined"), js(d, "return window.__pwned")
    headers = httpx.get(server.url + "/").headers
    assert "script-src 'self'" in headers["content-security-policy"]


def test_a_phone_sized_screen(browser, server):
    d = browser
    d.set_window_size(390, 844)
    try:
        open_page(d, server.url + "/")
        sidebar, toggle = d.find_element(*by("#sidebar")), d.find_element(*by("#open-sidebar"))
        assert toggle.is_displayed() and not d.find_element(*by("#model")).is_displayed()
        assert js(d, "return arguments[0].getBoundingClientRect().right <= 0", sidebar)  # off screen
        composer = d.find_element(*by("#composer")).rect
        assert composer["x"] >= 0 and composer["x"] + composer["width"] <= 390  # no sideways scrolling
        assert js(d, "return document.documentElement.scrollWidth") <= 390
        toggle.click()
        wait_for(lambda: js(d, "return arguments[0].getBoundingClientRect().left", sidebar) >= 0, 5,
                 "the list to slide in")
        assert toggle.get_attribute("aria-expanded") == "true"
        d.find_element(*by("#close-sidebar")).click()
        wait_for(lambda: js(d, "return arguments[0].getBoundingClientRect().right", sidebar) <= 0, 5,
                 "the list to slide out")
        set_field(d, "temperature", "0")
        set_field(d, "max_tokens", "32")
        d.find_element(*by("#open-settings")).click()  # closed again: the reply is what the screenshot shows
        ask(d, "Say hello in French.")
        follow_reply(d)
        assert reply_text(d) and js(d, "return document.documentElement.scrollWidth") <= 390
        screenshot(d, "chat-page-phone.png")
    finally:
        d.set_window_size(1280, 860)


def test_a_server_with_an_api_key_asks_for_it(browser, smollm_gguf, tmp_path):
    d = browser
    s = EmberServer(smollm_gguf, tmp_path, "--api-key", "sesame")
    try:
        d.get(s.url + "/")
        js(d, "localStorage.removeItem('ember.apiKey')")
        d.refresh()
        status = d.find_element(*by("#status"))
        wait_for(lambda: "API key" in status.text, 10, "the page to ask for the key")
        assert d.find_element(*by("#settings")).is_displayed()
        d.find_element(*by("#api-key")).send_keys("sesame", keys().TAB)
        wait_for(lambda: d.find_element(*by("#model")).text == MODEL, 10, "the page to work with the key")
        assert not status.is_displayed()
        assert httpx.get(s.url + "/v1/models").status_code == 401  # the page being public opened nothing
    finally:
        s.stop()


def test_a_bad_setting_is_a_clear_error_and_loses_nothing(browser, server):
    d = browser
    open_page(d, server.url + "/")
    set_field(d, "temperature", "-1")
    set_field(d, "max_tokens", "64")
    d.find_element(*by("#prompt")).send_keys("Name a colour.", keys().ENTER)
    status = d.find_element(*by("#status"))
    wait_for(lambda: "temperature" in status.text, 10, "the server's complaint on the page")
    assert status.get_attribute("data-kind") == "error" and not replies(d)
    cid = conversation_id(d)
    assert [m["content"] for m in stored(server, cid)["messages"]] == ["Name a colour."]  # the question stays
    set_field(d, "temperature", "0")
    js(d, WATCH)
    d.find_element(*by("#messages article.user button[aria-label='Ask for a reply again']")).click()
    follow_reply(d)
    assert not status.is_displayed()
    want = greedy(server, [{"role": "user", "content": "Name a colour."}], 64)
    assert [m["content"] for m in stored(server, cid)["messages"]] == ["Name a colour.", want]

    # a Regenerate that fails leaves the old reply in the store until a Retry replaces it
    set_field(d, "temperature", "-1")
    replies(d)[-1].find_element(*by("button[aria-label='Regenerate the last reply']")).click()
    wait_for(lambda: "temperature" in status.text and not replies(d), 10, "the failed regeneration")
    set_field(d, "temperature", "0")
    js(d, WATCH)
    d.find_element(*by("#messages article.user button[aria-label='Ask for a reply again']")).click()
    follow_reply(d)
    assert [m["content"] for m in stored(server, cid)["messages"]] == ["Name a colour.", want]


SSE = """const done = arguments[arguments.length - 1];
(async () => {
  const { events } = await import('/ui/api.js');
  const chunks = (parts) => new Response(new ReadableStream({ start(c) {
    for (const p of parts) c.enqueue(new TextEncoder().encode(p));
    c.close();
  } }));
  const out = [];
  for await (const ev of events(chunks(['data: {"a":1}\\r', '\\n\\r\\ndata: {"b":', '2}\\n\\ndata: {"c":\\n',
                                          'data: 3}\\r\\r: a comment\\ndata: [DONE]\\n\\n', 'data: {"late":1}\\n\\n'])))
    out.push(ev);
  let cut = null;
  try { for await (const ev of events(chunks(['data: {"x":1}\\n\\n']))) out.push(ev); } catch (e) { cut = e.code; }
  return { out, cut };
})().then(done, (e) => done({ error: String(e) }));"""


def test_the_stream_reader_takes_any_line_ending_and_notices_a_cut(browser, server):
    """The page's SSE reader (ui/api.js), run in the browser on streams split at awkward places."""
    d = browser
    open_page(d, server.url + "/")
    got = d.execute_async_script(SSE)
    assert got == {"out": [{"a": 1}, {"b": 2}, {"c": 3}, {"x": 1}], "cut": "incomplete"}, got


def test_a_system_prompt_is_sent_stored_and_counted_when_a_reply_is_replaced(browser, server):
    """The store holds the system prompt as its first message, the page does not show it: Regenerate must
    replace the reply at the store's index, not the page's."""
    d = browser
    open_page(d, server.url + "/")
    set_field(d, "system", "Answer in one word.")
    set_field(d, "temperature", "0")
    set_field(d, "max_tokens", "24")
    ask(d, QUESTION)
    follow_reply(d)
    cid = conversation_id(d)
    history = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": QUESTION}]
    want = greedy(server, history, 24)
    assert [m["content"] for m in stored(server, cid)["messages"]] == [history[0]["content"], QUESTION, want]
    assert len(d.find_elements(*by("#messages article"))) == 2  # the system prompt is a setting, not a message

    before = stored(server, cid)["updated"]
    js(d, WATCH)
    replies(d)[-1].find_element(*by("button[aria-label='Regenerate the last reply']")).click()
    follow_reply(d)
    conv = wait_for(lambda: (c := stored(server, cid))["updated"] > before and c, 5, "the regenerated reply saved")
    assert [m["content"] for m in conv["messages"]] == [history[0]["content"], QUESTION, want]

    set_field(d, "system", "Be brief.")  # a changed prompt replaces the stored one, in place
    wait_for(lambda: stored(server, cid)["messages"][0]["content"] == "Be brief.", 5, "the new system prompt")
    assert len(stored(server, cid)["messages"]) == 3
