"""`serve` in a recipe: start the server, wait for `/ready`, send one request to every route the model serves,
print what each answered, and stop (`llmk run --serve-forever` keeps it up instead).

The check goes through real HTTP on loopback, through the same app, gate, keys and limits as `llmk serve`,
so a recipe that ends with a served model proves it answers. Its port is a free one unless the server is
to stay up, so a check never collides with a server already running on the configured port. With
`--api_keys`, the check sends the key in the environment variable `LLMK_API_KEY` (only its hash is on disk).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Any

from llmkernel.errors import ConfigError, InputError
from llmkernel.serve.config import ServeConfig

# One request per route; short, deterministic (greedy), about what the demo corpus is about.
SAMPLE_REQUESTS: dict[str, dict[str, Any]] = {
    "/v1/completions": {"prompt": "The for statement", "max_tokens": 24, "temperature": 0},
    "/v1/chat/completions": {
        "messages": [{"role": "user", "content": "What does the for statement do?"}],
        "max_tokens": 24,
        "temperature": 0,
    },
    "/v1/embeddings": {"input": ["Return a shallow copy of the list.", "Return a copy of the dictionary."]},
    "/v1/classify": {"input": ["Return a new list of the words in the string, using sep as the delimiter."]},
    "/v1/ner": {"input": ["Guido van Rossum released Python in Amsterdam in 1991."]},
    "/v1/search": {"query": "What does the for statement do?", "k": 3},
}
READY_TIMEOUT_S = 300.0  # loading a model folder (and warming it up) on 2 busy cores


def probe(config: ServeConfig, serve_forever: bool = False) -> dict[str, Any]:
    """Start `config`'s server, check `/ready` and every route once, stop it; returns what each answered.

    Raises:
        InputError: the model did not load, or a route did not answer 200.
        ConfigError: the server has keys and `LLMK_API_KEY` is not set.
    """
    from llmkernel.serve.server import prepare_server, serve

    if serve_forever:
        serve(config)
        return {}
    headers = {}
    if config.api_keys:
        key = os.environ.get("LLMK_API_KEY", "")
        if not key:
            raise ConfigError(
                f"serve: the server checks keys ({config.api_keys}); set LLMK_API_KEY to one of them "
                "(`llmk keys create --keys-file FILE` prints a new one) so the recipe can query it"
            )
        headers["Authorization"] = f"Bearer {key}"
    server, sock, services = prepare_server(dataclasses.replace(config, port=0))
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    print(f"  serving {services.model_dir} ({services.task}) on {url} for the check")
    quiet = _Quiet()  # the server's JSON request log would bury the lines below; warnings still show
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _wait_ready(url, services, thread, headers)
        answers = {route: _ask(url, route, headers) for route in _routes(services)}
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        quiet.restore()
    return {"url": url, "model": services.model_name, "task": services.task, "routes": answers}


class _Quiet:
    """The server's loggers at WARNING until `restore`."""

    NAMES = ("llmkernel.serve", "uvicorn", "uvicorn.error")

    def __init__(self) -> None:
        self.levels = {name: logging.getLogger(name).level for name in self.NAMES}
        for name in self.NAMES:
            logging.getLogger(name).setLevel(logging.WARNING)

    def restore(self) -> None:
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)


def _routes(services: Any) -> list[str]:
    """The routes to check: all the model serves, but chat for a decoder without a chat template (its
    tokenizer has none until a chat fine-tune gives it one; chat then answers 400 by design)."""
    routes = list(services.routes)
    if "/v1/chat/completions" in routes and not getattr(services.tokenizer, "chat_template", None):
        routes.remove("/v1/chat/completions")
        print("  POST /v1/chat/completions    not checked: the model has no chat template (a base model)")
    return routes


def _wait_ready(url: str, services: Any, thread: threading.Thread, headers: dict[str, str]) -> None:
    """Until `/ready` answers 200 (it needs the key, as every route but /health does)."""
    import httpx

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if services.lifecycle.status == "failed" or not thread.is_alive():
            raise InputError(services.load_error or "serve: the server stopped before it was ready")
        try:
            response = httpx.get(f"{url}/ready", headers=headers, timeout=5)
        except httpx.HTTPError:
            response = None  # not listening yet
        if response is not None and response.status_code == 200:
            return
        if response is not None and response.status_code in (401, 403):
            message = response.json().get("error", {}).get("message", "")
            raise InputError(f"serve: /ready answered {response.status_code}: {message} (LLMK_API_KEY)")
        time.sleep(0.2)
    raise InputError(f"serve: {url}/ready did not answer 200 within {READY_TIMEOUT_S:g} s")


def _ask(url: str, route: str, headers: dict[str, str]) -> dict[str, Any]:
    """One request to `route`: its status, latency and a one-line summary of the answer."""
    import httpx

    body = SAMPLE_REQUESTS[route]
    started = time.perf_counter()
    response = httpx.post(f"{url}{route}", json=body, headers=headers, timeout=120)
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        message = response.json().get("error", {}).get("message", response.text[:200])
        raise InputError(f"serve: {route} answered {response.status_code}: {message}")
    answer = _summary(route, response.json())
    print(f"  POST {route:<22} 200 in {seconds * 1000:,.0f} ms: {answer}")
    return {"status": 200, "seconds": round(seconds, 4), "request": body, "answer": answer}


def _summary(route: str, payload: dict[str, Any]) -> str:
    if route == "/v1/completions":
        return repr(payload["choices"][0]["text"][:120])
    if route == "/v1/chat/completions":
        return repr(payload["choices"][0]["message"]["content"][:120])
    if route == "/v1/embeddings":
        first, second = (item["embedding"] for item in payload["data"][:2])
        dot = sum(a * b for a, b in zip(first, second, strict=True))
        norms = (sum(a * a for a in first) * sum(b * b for b in second)) ** 0.5
        return f"{len(first)} dimensions, cosine similarity of the two texts {dot / norms:.3f}"
    if route == "/v1/classify":
        result = payload["data"][0]
        return f"label {result['label']!r} (score {result['score']:.3f})"
    if route == "/v1/search":
        return ", ".join(f"{p['id']} ({p['score']:.3f})" for p in payload["data"]) or "no passages"
    entities = payload["data"][0].get("entities", [])
    return ", ".join(f"{e['text']!r}: {e['type']}" for e in entities) or "no entities"
