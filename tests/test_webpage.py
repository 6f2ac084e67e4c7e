"""The web chat page in a real browser: Debian's Chromium driven by Playwright (headless, no network).

Needs ``apt-get install -y chromium`` and ``pip install playwright`` (the Python package only: never
``playwright install``, which downloads browsers); skipped with the reason when either is missing.
"""

import os

import pytest
import torch

import nanoseek
from nanoseek.data.tokenizer import load_tokenizer
from nanoseek.infer import Engine
from nanoseek.infer.server import create_app
from serve_helpers import ANSWER, QUESTION, REASONING, live_server, tiny_checkpoint

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "page-key"


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is missing (pip install playwright)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = load_tokenizer(ckpt)
    engine = Engine(nanoseek.load(ckpt), tok, max_slots=2)
    try:
        with live_server(create_app(engine, tok, "tiny-chat", api_key=KEY)) as url:
            yield url
    finally:
        torch.set_num_threads(threads)


def test_page_streams_reasoning_and_answer(browser, server_url):
    page = browser.new_page()
    page.set_default_timeout(30_000)
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server_url)
               else route.abort())  # the page must need nothing from outside
    page.goto(server_url + "/")
    assert "tiny-chat" in page.inner_text("#model-name")

    # without the key the server's 401 message is shown
    page.fill("#prompt", QUESTION)
    page.click("#send")
    page.wait_for_selector(".msg.error")
    assert "API key" in page.inner_text(".msg.error")

    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.fill("#temperature", "0")
    page.fill("#prompt", QUESTION)
    page.click("#send")
    page.wait_for_function("() => { const a = document.querySelectorAll('.msg.assistant .answer');"
                           " return a.length > 0 && a[a.length - 1].textContent.length > 0; }")
    page.wait_for_function("() => !document.querySelector('#send').disabled")  # the stream has ended
    answer = page.locator(".msg.assistant .answer").last.inner_text()
    reasoning = page.locator(".msg.assistant .reasoning-text").last.text_content()
    assert answer == ANSWER
    assert reasoning == REASONING
    assert "finish: stop" in page.locator(".msg.assistant .meta").last.inner_text()

    # a second turn goes out with the history and gets an answer too
    page.fill("#prompt", "and then?")
    page.keyboard.press("Enter")  # Enter sends
    page.wait_for_function("() => document.querySelectorAll('.msg.user').length === 3 &&"
                           " document.querySelectorAll('.msg.assistant .meta').length === 2 &&"
                           " document.querySelectorAll('.msg.assistant .meta')[1].textContent.length > 0")
    page.close()
