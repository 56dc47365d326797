"""The page at GET / (llmkernel/serve/chat/): open without a key, nothing loaded from outside, the panels of
the routes each model kind serves; and in headless Chromium against a live tiny model: a wrong key shown as
a 401, a streamed reply with its stats, a stop mid-stream that ends the generation on the server, a
classifier's label, similarity and 429, and a NER model's entities."""

from __future__ import annotations

import json
import re
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from llmkernel.serve.app import create_app
from llmkernel.serve.chat.page import PANELS, read
from llmkernel.serve.security import KeyStore, create_key
from tests.conftest import REPO
from tests.serve.conftest import serve_config
from tests.serve.test_gate import live_app, slow_forward

SCREENSHOTS = REPO / "runs" / "screenshots"
CHAT_CONTROLS = {"messages", "prompt", "send", "stop", "temperature", "max-tokens", "new-chat"}


class Page(HTMLParser):
    """The ids, the `for` of labels, the outside URLs and the config of a page."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.labelled: set[str] = set()
        self.links: list[str] = []
        self.hidden: set[str] = set()
        self.config: dict[str, Any] = {}
        self._in_config = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if "id" in attributes:
            self.ids.add(attributes["id"])
            if "hidden" in attributes:
                self.hidden.add(attributes["id"])
        if tag == "label":
            self.labelled.add(attributes["for"])
        self.links += [attributes[name] for name in ("src", "href") if attributes.get(name)]
        self._in_config = attributes.get("id") == "llmk-config"

    def handle_data(self, data: str) -> None:
        if self._in_config:
            self.config = json.loads(data)
            self._in_config = False


def keyed_app(tmp_path: Path, model_dir: Path, **options: Any) -> tuple[Any, dict[str, str]]:
    key, _ = create_key(tmp_path / "keys.json", "alice")
    app = create_app(
        serve_config(model_dir, **options), model_dir=model_dir, keys=KeyStore.load(tmp_path / "keys.json")
    )
    return app, {"Authorization": f"Bearer {key}"}


# ------------------------------------------------------------------------------------------ the page


def test_the_page_and_its_files_need_no_key_and_load_nothing_from_outside(tmp_path, llama_dir):
    app, auth = keyed_app(tmp_path, llama_dir)
    client = TestClient(app)  # no lifespan: the page does not wait for the model
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "script-src 'self'" in policy
    parsed = Page(page.text)
    assert {link.split("?")[0] for link in parsed.links} == {"data:,", "chat.css", "chat.js"}
    for name in ("chat.js", "chat.css"):
        answer = client.get(f"/{name}")
        assert answer.status_code == 200 and answer.text == read(name)
        assert answer.headers["content-type"].startswith(
            "text/javascript" if name == "chat.js" else "text/css"
        )
        assert "max-age" in answer.headers["cache-control"]
    for text in (page.text, read("chat.js"), read("chat.css")):
        assert not re.search(r"https?:|//[a-z]|@import|url\(", text, re.IGNORECASE), "an outside URL"
    assert parsed.config["key_required"] is True and "key-field" not in parsed.hidden
    assert client.get("/v1/models").status_code == 401  # what the page calls still needs the key
    assert client.get("/v1/models", headers=auth).status_code == 200
    assert "/" not in client.get("/openapi.json", headers=auth).json()["paths"]


@pytest.mark.parametrize(
    "model, task, panels",
    [
        ("llama_dir", "generate", {"chat-panel"}),
        ("bert_dir", "embed", {"embed-panel"}),
        ("classifier_dir", "classify", {"classify-panel", "embed-panel"}),
        ("ner_dir", "ner", {"ner-panel"}),
    ],
)
def test_the_page_offers_the_routes_its_model_serves(request, model, task, panels):
    model_dir = request.getfixturevalue(model)
    app = create_app(serve_config(model_dir), model_dir=model_dir)
    page = Page(TestClient(app).get("/").text)
    assert {id for id in page.ids if id.endswith("-panel")} == panels
    routes = app.state.services.routes
    assert page.config == {"task": task, "routes": routes, "key_required": False, "max_tokens": 32}
    assert "key-field" in page.hidden  # no keys: no key field
    inputs = {"prompt", "temperature", "max-tokens", "text-a", "text-b", "classify-text", "ner-text"}
    assert page.ids & inputs <= page.labelled, "every input has a label"
    assert (CHAT_CONTROLS <= page.ids) == (task == "generate")


def test_every_route_with_a_panel_is_a_route_some_model_serves():
    from llmkernel.serve.state import ROUTES

    served = {route for routes in ROUTES.values() for route in routes}
    assert set(PANELS) <= served


def test_page_requests_count_as_requests_not_as_errors_or_model_latency(bert_dir):
    app = create_app(serve_config(bert_dir), model_dir=bert_dir)
    client = TestClient(app)
    for path in ("/", "/chat.js", "/chat.css"):
        assert client.get(path).status_code == 200
    registry = app.state.services.metrics.registry
    assert registry.get_sample_value("llmk:requests_total", {"route": "/", "code": "200"}) == 1
    assert registry.get_sample_value("llmk:e2e_request_latency_seconds_count") == 0
    assert not [s for m in registry.collect() if m.name == "llmk:request_errors" for s in m.samples]


# --------------------------------------------------------------------------------------- in Chromium


def wait_for(condition: Any, timeout: float = 30.0, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(every)
    raise TimeoutError(f"not within {timeout} s: {condition}")


def texts(browser: Any, selector: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [element.text for element in browser.find_elements(By.CSS_SELECTOR, selector)]


def by_id(browser: Any, element_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, element_id)


def fill(browser: Any, element_id: str, value: str) -> None:
    field = by_id(browser, element_id)
    field.clear()
    field.send_keys(value)


def click(browser: Any, element_id: str) -> None:
    by_id(browser, element_id).click()


def generated_tokens(app: Any) -> float:
    return app.state.services.metrics.registry.get_sample_value("llmk:generation_tokens_total") or 0.0


@pytest.mark.e2e
def test_chat_in_chromium_a_wrong_key_a_streamed_reply_and_a_stop(tmp_path, llama_dir, browser):
    app, auth = keyed_app(tmp_path, llama_dir, max_tokens=220)
    key = auth["Authorization"].removeprefix("Bearer ")
    with live_app(app, auth) as url:
        engine = app.state.services.engine
        slow_forward(engine, 0.03)  # about 30 tokens a second, so a reply is seen growing and stopped
        browser.get(url)
        assert "enter the API key" in texts(browser, "#model")[0]

        fill(browser, "key", "llmk-wrong")
        fill(browser, "prompt", "Hello there")
        click(browser, "send")
        error = wait_for(lambda: texts(browser, ".message.error"))[0]
        assert error.startswith("401:") and "API key" in error
        assert by_id(browser, "prompt").get_attribute("value") == "Hello there"  # kept to retry

        fill(browser, "key", key)
        fill(browser, "temperature", "0")
        fill(browser, "max-tokens", "40")
        click(browser, "send")  # the key field's change event stores the key and names the model
        assert wait_for(lambda: "(generate)" in texts(browser, "#model")[0])
        assert browser.execute_script("return sessionStorage.getItem('llmk-api-key')") == key
        lengths, deadline = [], time.monotonic() + 30
        while not texts(browser, ".stats"):
            assert time.monotonic() < deadline, "the reply did not end"
            replies = texts(browser, ".reply")
            if replies and (not lengths or len(replies[-1]) != lengths[-1]):
                lengths.append(len(replies[-1]))
            time.sleep(0.02)
        assert len(lengths) >= 3 and lengths == sorted(lengths), f"the reply did not grow: {lengths}"
        stats = texts(browser, ".stats")[-1]
        assert re.search(r"time to first token \d+\.\d\d s · \d+\.\d tokens/s · 40 tokens · length", stats)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOTS / "chat.png"))  # the 401, then a streamed reply

        click(browser, "new-chat")  # a fresh conversation, so 200 more tokens fit the tiny context
        assert not texts(browser, ".message")
        fill(browser, "max-tokens", "200")
        fill(browser, "prompt", "Tell me a long story")
        before = generated_tokens(app)
        click(browser, "send")
        wait_for(lambda: len((texts(browser, ".reply") or [""])[-1]) > 20)
        click(browser, "stop")
        stopped = wait_for(lambda: texts(browser, ".stats"))[-1]
        assert "stopped" in stopped
        shown = texts(browser, ".reply")[-1]
        time.sleep(0.5)
        assert texts(browser, ".reply")[-1] == shown, "the reply grew after stop"
        # the server ended the generation: its tokens are counted once it is over, short of max_tokens
        wait_for(lambda: generated_tokens(app) > before, timeout=10)
        assert generated_tokens(app) - before < 200
        assert engine.num_running == 0 and engine.num_waiting == 0
        assert by_id(browser, "send").is_enabled() and not by_id(browser, "stop").is_enabled()
        browser.save_screenshot(str(SCREENSHOTS / "chat-stopped.png"))


@pytest.mark.e2e
def test_classifier_and_ner_pages_in_chromium(classifier_dir, ner_dir, browser):
    # 3 requests a minute: the page's /v1/models, one classify and one comparison; the next one gets 429
    app = create_app(serve_config(classifier_dir, requests_per_minute=3), model_dir=classifier_dir)
    with live_app(app) as url:
        browser.get(url)
        assert not by_id(browser, "key").is_displayed()  # the server has no keys
        assert wait_for(lambda: "(classify)" in texts(browser, "#model")[0])
        fill(browser, "classify-text", "What a wonderful film!")
        click(browser, "classify")
        label = wait_for(lambda: texts(browser, "#classify-result .label"))[0]
        assert label in app.state.services.encoder.model.config.id2label.values()
        assert len(texts(browser, "#classify-result .scores tr")) == 2
        click(browser, "embed")
        similarity = wait_for(lambda: texts(browser, "#embed-result .similarity"))[0]
        assert re.fullmatch(r"cosine similarity -?[01]\.\d{4} \(32 dimensions\)", similarity)
        click(browser, "classify")
        error = wait_for(lambda: texts(browser, "#classify-result .error"))[0]
        assert error.startswith("429:") and "requests per minute" in error and "Retry-After: " in error
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOTS / "classify.png"))

    with live_app(create_app(serve_config(ner_dir), model_dir=ner_dir)) as url:
        browser.get(url)
        fill(browser, "ner-text", "Alice moved from Paris to Berlin.")
        click(browser, "ner")
        count = wait_for(lambda: texts(browser, "#ner-result .count"))[0]
        marked = texts(browser, "#ner-result .entity")
        assert count == f"{len(marked)} entities"  # a random tiny model: any number, each one marked
        without_types = browser.execute_script(
            "const p = document.querySelector('#ner-result .entities').cloneNode(true);"
            "p.querySelectorAll('.entity-type').forEach((type) => type.remove()); return p.textContent;"
        )
        assert without_types == "Alice moved from Paris to Berlin."  # the spans cut at their offsets
