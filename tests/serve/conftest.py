"""Tiny random model folders for the server tests, and helpers to run an app in-process or on loopback.

The folders come from tests/tiny_models.py (shared with the finetune and evaluate tests).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi.testclient import TestClient

from llmkernel.serve.app import create_app
from llmkernel.serve.config import ServeConfig
from tests.tiny_models import make_tiny_bert, make_tiny_llama, make_tiny_relation


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), "model")


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-classifier"), "classify")


@pytest.fixture(scope="session")
def ner_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-ner"), "ner")


@pytest.fixture(scope="session")
def relation_dir(tmp_path_factory) -> Path:
    return make_tiny_relation(tmp_path_factory.mktemp("tiny-relation"))


# TestClient sends `Host: testserver`; the loopback default accepts localhost names only.
TEST_HOSTS = ["testserver", "localhost", "127.0.0.1", "::1"]


@pytest.fixture(scope="session")
def beir(tmp_path_factory) -> Path:
    """A tiny corpus in the BEIR layout (tests/retrieval/tiny_beir.py)."""
    from tests.retrieval.tiny_beir import make_tiny_beir

    return make_tiny_beir(tmp_path_factory.mktemp("beir") / "tiny")


@pytest.fixture(scope="session")
def index_dir(tmp_path_factory, beir, bert_dir) -> Path:
    """`beir` indexed by `llmk index` with the tiny BERT."""
    from llmkernel.retrieval.build import build_index
    from llmkernel.retrieval.config import IndexConfig

    out = tmp_path_factory.mktemp("index") / "index"
    build_index(IndexConfig(encoder=str(bert_dir), corpus=str(beir), out=str(out), progress=False))
    return out


def serve_config(model_dir: Path, **overrides: Any) -> ServeConfig:
    defaults = {"batch_window_ms": 2.0, "max_tokens": 32, "allowed_hosts": TEST_HOSTS}
    return ServeConfig(model=str(model_dir), **{**defaults, **overrides})


def wait_ready(client: TestClient, headers: dict[str, str] | None = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get("/ready", headers=headers or {}).json().get("status")
        if status == "ready":
            return
        assert status != "failed", client.app.state.services.load_error
        time.sleep(0.02)
    raise TimeoutError("the model did not become ready")


@contextlib.contextmanager
def running_client(
    model_dir: Path, headers: dict[str, str] | None = None, **kwargs: Any
) -> Iterator[TestClient]:
    """An in-process client (lifespan run, model loaded and warm) for an app built by create_app."""
    config = kwargs.pop("config", None) or serve_config(model_dir, **kwargs.pop("options", {}))
    app = create_app(config, model_dir=model_dir, **kwargs)
    with TestClient(app) as client:
        wait_ready(client, headers)
        yield client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def live_server(app: Any, http: Any = "auto") -> Iterator[str]:
    """Run `app` under a real uvicorn on a free loopback port in a thread; yields the base URL. `http`:
    uvicorn's protocol class (`llmkernel.serve.server.http_protocol` for the connection limits)."""
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), http=http, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
