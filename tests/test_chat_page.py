# Run: python -m pytest -q tests/test_chat_page.py   (needs Chromium: `apt-get install -y chromium`; skips without it)
"""The chat page at `/` in a real headless browser (Debian's Chromium driven by Playwright): type a
message, watch the streamed reply appear, continue the conversation, stop a reply, clear."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

from server_process import series, start_server, stop_server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

KEY = "sk-page-test"
MODEL = "deepseek-v2-default"


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found (apt-get install -y chromium)")


@pytest.fixture(scope="module")
def server():
    proc, url, _ = start_server("--num-kv-blocks", "128", "--api-key", KEY)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page()
        page.goto(server + "/")
        page.fill("#api-key", KEY)
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.getElementById('model-name').textContent.includes('context')")
        yield page
        browser.close()


def greedy_reply(server: str, messages: list[dict], max_tokens: int) -> str:
    r = httpx.post(server + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"messages": messages, "max_tokens": max_tokens, "temperature": 0})
    return r.json()["choices"][0]["message"]["content"]


def send(page, text: str) -> str:
    """Type a message, press Enter, wait for the streamed reply to finish; returns the reply."""
    n = page.locator(".msg.assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(f"document.querySelectorAll('.msg.assistant[data-done]').length === {n + 1}",
                           timeout=30000)
    return page.locator(".msg.assistant .content").nth(n).text_content()


def set_controls(page, system: str, temperature: str, max_tokens: str) -> None:
    page.fill("#system", system)
    page.eval_on_selector("#temperature", f"(el) => {{ el.value = '{temperature}'; }}")
    page.fill("#max-tokens", max_tokens)


def test_conversation_streams_and_continues(page, server):
    set_controls(page, "You are a test.", "0", "24")
    streamed_chunks = []
    page.on("response", lambda r: streamed_chunks.append(r.headers.get("content-type", ""))
            if "/v1/chat/completions" in r.url else None)
    first = send(page, "Hello, who are you?")
    history = [{"role": "system", "content": "You are a test."}, {"role": "user", "content": "Hello, who are you?"}]
    assert first and first == greedy_reply(server, history, 24)
    assert any(ct.startswith("text/event-stream") for ct in streamed_chunks)
    second = send(page, "Tell me more.")
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "Tell me more."}]
    assert second == greedy_reply(server, history, 24)  # the page sent the whole conversation
    assert page.locator(".msg.user").count() == 2 and page.locator(".msg.assistant").count() == 2


def test_stop_copy_and_clear(page, server):
    set_controls(page, "", "0", "3000")  # greedy: this prompt runs on without an EOS
    page.fill("#input", "Write forever")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant .content')[document.querySelectorAll("
                           "'.msg.assistant').length - 1].textContent.length > 0", timeout=30000)
    page.click("#stop")
    page.wait_for_function("document.body.dataset.busy === ''")
    assert page.locator("#status").text_content() == "stopped"
    deadline = time.monotonic() + 5  # the server aborted the request: nothing runs any more
    while series(httpx.get(server + "/metrics").text, "num_requests_running", model_name=MODEL) != 0:
        assert time.monotonic() < deadline, "the stopped request is still running"
        time.sleep(0.05)
    page.locator(".msg.assistant .copy").last.click()
    page.wait_for_function("[...document.querySelectorAll('.msg.assistant .copy')]"
                           ".some(b => b.textContent === 'Copied')")
    page.click("#clear")
    assert page.locator(".msg").count() == 0
    set_controls(page, "", "0", "8")
    assert send(page, "Fresh start") == greedy_reply(server, [{"role": "user", "content": "Fresh start"}], 8)


def test_without_the_key_the_message_is_kept_and_the_page_asks_for_the_key(page, server):
    assert httpx.get(server + "/favicon.ico").status_code == 200
    fresh = page.context.browser.new_context()  # its own storage: no key saved
    page = fresh.new_page()
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('model-name').textContent === 'not connected'")
    assert "API key box" in page.locator("#status").text_content()
    page.fill("#input", "Hello there")
    page.press("#input", "Enter")
    # the page asks the server again (a 401) before it gives the message back: wait for that, not for
    # the status, which already named the key box before Enter
    page.wait_for_function("document.getElementById('input').value === 'Hello there'")  # not lost
    assert "API key box" in page.locator("#status").text_content()
    assert page.locator(".msg").count() == 0
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.getElementById('model-name').textContent.includes('context')")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant[data-done]').length === 1", timeout=30000)
    assert page.input_value("#input") == ""
    fresh.close()
