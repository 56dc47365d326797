"""The server under abuse and faults: Host checks, keys before bodies, per-key and queue limits, slow
clients (408), clients that leave (their work cancelled), engines that die or fail (/ready says so, no
request hangs), invalid Unicode (400), and every 5xx with its request id."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from llmkernel.serve.app import create_app
from llmkernel.serve.security import KeyStore, create_key
from llmkernel.serve.server import http_protocol
from tests.serve.conftest import live_server, running_client, serve_config, wait_ready

COMPLETION = {"prompt": "Hello world", "max_tokens": 4, "temperature": 0}


def slow_forward(engine: Any, seconds: float) -> None:
    """Each step of the real engine takes at least `seconds` (so that requests stay in flight)."""
    forward = engine.model.forward

    def slowed(step):
        time.sleep(seconds)
        return forward(step)

    engine.model.forward = slowed


@contextlib.contextmanager
def live_app(app: Any, headers: dict[str, str] | None = None) -> Iterator[str]:
    """`app` under uvicorn on loopback with the connection limits of `llmk serve`, once it is ready."""
    services = app.state.services
    with live_server(app, http=http_protocol(services.config, services.metrics)) as url:
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/ready", headers=headers or {}).status_code != 200:
            assert time.monotonic() < deadline, "the model did not become ready"
            time.sleep(0.05)
        yield url


def read_answer(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


# ------------------------------------------------------------------------------------ host and keys


def test_host_header_must_name_this_machine_when_bound_to_loopback(bert_dir):
    app = create_app(serve_config(bert_dir, allowed_hosts=None), model_dir=bert_dir)
    with live_app(app) as url:
        port = url.rsplit(":", 1)[1]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
            assert httpx.get(f"{url}/health", headers={"Host": host}).status_code == 200, host
        refused = httpx.get(f"{url}/v1/models", headers={"Host": f"attacker.example:{port}"})
        assert refused.status_code == 403
        error = refused.json()["error"]
        assert "attacker.example" in error["message"] and "--allowed_hosts" in error["message"]
    named = {"Host": "llm.example.com"}
    with running_client(bert_dir, named, options={"allowed_hosts": ["llm.example.com"]}) as client:
        assert client.get("/health").status_code == 403  # TestClient sends Host: testserver
        assert client.get("/health", headers=named).status_code == 200


def test_the_key_is_checked_before_the_body_is_read_and_docs_need_one(tmp_path, bert_dir):
    key, _ = create_key(tmp_path / "keys.json", "alice")
    keys = KeyStore.load(tmp_path / "keys.json")
    auth = {"Authorization": f"Bearer {key}"}
    with running_client(bert_dir, auth, keys=keys) as client:
        bad_body = client.post(
            "/v1/embeddings", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert bad_body.status_code == 401  # not 400: an unauthenticated client learns nothing
        for path in ("/docs", "/redoc", "/openapi.json", "/v1/models", "/ready"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers=auth).status_code == 200, path
        assert client.get("/health").status_code == 200
        assert client.post("/v1/embeddings", content=b"{not json", headers=auth).status_code == 400


# ------------------------------------------------------------------------------------------- limits


def test_per_key_concurrency_and_the_waiting_queue_answer_429(tmp_path, llama_dir):
    keys_file = tmp_path / "keys.json"
    alice, _ = create_key(keys_file, "alice")
    bob, _ = create_key(keys_file, "bob")
    headers = {name: {"Authorization": f"Bearer {key}"} for name, key in (("alice", alice), ("bob", bob))}
    config = serve_config(llama_dir, max_concurrent_per_key=1, max_batch_size=1, max_waiting=1)
    app = create_app(config, model_dir=llama_dir, keys=KeyStore.load(keys_file))
    with live_app(app, headers["alice"]) as url:
        slow_forward(app.state.services.engine, 0.05)
        long = {**COMPLETION, "max_tokens": 30}
        with httpx.Client(base_url=url, timeout=60) as client:
            threads = [
                threading.Thread(
                    target=client.post, args=("/v1/completions",), kwargs={"json": long, "headers": h}
                )
                for h in (headers["alice"], headers["bob"])
            ]
            threads[0].start()
            time.sleep(0.3)  # alice's request runs (the one slot)
            threads[1].start()
            time.sleep(0.3)  # bob's waits (the queue of one is full)
            second = client.post("/v1/completions", json=COMPLETION, headers=headers["alice"])
            assert second.status_code == 429 and second.headers["Retry-After"] == "1"
            assert "--max_concurrent_per_key" in second.json()["error"]["message"]
            queued = client.post("/v1/completions", json=COMPLETION, headers=headers["bob"])
            assert queued.status_code == 429, queued.text  # bob has one in flight already (waiting)
            for thread in threads:
                thread.join(timeout=60)
            assert (
                client.post("/v1/completions", json=COMPLETION, headers=headers["alice"]).status_code == 200
            )


def test_the_queue_bound_refuses_what_would_wait_past_it(llama_dir):
    config = serve_config(llama_dir, max_batch_size=1, max_waiting=1, max_concurrent_per_key=0)
    app = create_app(config, model_dir=llama_dir)
    with live_app(app) as url:
        slow_forward(app.state.services.engine, 0.05)
        long = {**COMPLETION, "max_tokens": 30}
        with httpx.Client(base_url=url, timeout=60) as client:
            threads = [
                threading.Thread(target=client.post, args=("/v1/completions",), kwargs={"json": long})
                for _ in range(2)
            ]
            for thread in threads:
                thread.start()
                time.sleep(0.3)
            refused = client.post("/v1/completions", json=COMPLETION)
            assert refused.status_code == 429, refused.text
            assert "--max_waiting" in refused.json()["error"]["message"]
            for thread in threads:
                thread.join(timeout=60)


def test_slow_headers_idle_sockets_and_slow_bodies_get_408_and_connections_are_bounded(bert_dir):
    config = serve_config(bert_dir, header_timeout_s=0.5, body_timeout_s=0.5, limit_concurrency=3)
    app = create_app(config, model_dir=bert_dir)
    with live_app(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as idle:
            started = time.monotonic()
            answer = read_answer(idle)
            assert answer.startswith(b"HTTP/1.1 408") and b"--header_timeout_s" in answer
            assert time.monotonic() - started < 5
        with socket.create_connection(("127.0.0.1", port)) as partial:
            partial.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\n")
            assert read_answer(partial).startswith(b"HTTP/1.1 408")
        with socket.create_connection(("127.0.0.1", port)) as slow_body:
            slow_body.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"input": '
            )
            answer = read_answer(slow_body)
            assert answer.startswith(b"HTTP/1.1 408") and b"--body_timeout_s" in answer
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            with socket.create_connection(("127.0.0.1", port)) as extra:
                answer = read_answer(extra)
                assert answer.startswith(b"HTTP/1.1 429") and b"retry-after: 1" in answer.lower()
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.2)
        assert httpx.get(f"{url}/health").status_code == 200  # the limit frees with the connections
        metrics = httpx.get(f"{url}/metrics").text
        assert 'llmk:connections_refused_total{code="408"} 2.0' in metrics
        assert 'llmk:connections_refused_total{code="429"} 1.0' in metrics


def test_tokens_per_minute_is_enforced_on_encoder_routes(bert_dir):
    with running_client(bert_dir, options={"tokens_per_minute": 12}) as client:
        too_big = client.post("/v1/embeddings", json={"input": "word " * 20})
        assert too_big.status_code == 400 and "--tokens_per_minute" in too_big.json()["error"]["message"]
        codes = [client.post("/v1/embeddings", json={"input": "one two"}).status_code for _ in range(4)]
        assert codes[0] == 200 and 429 in codes  # 4 tokens each ([CLS] one two [SEP]): 3 fit in 12


# -------------------------------------------------------------------------------- leaving and faults


def test_a_client_that_leaves_a_non_streamed_request_stops_its_generation(llama_dir):
    app = create_app(serve_config(llama_dir, max_tokens=200), model_dir=llama_dir)
    with live_app(app) as url:
        engine = app.state.services.engine
        slow_forward(engine, 0.02)
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"prompt": "Hello", "max_tokens": 200, "temperature": 0}).encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            deadline = time.monotonic() + 10
            while engine.num_running == 0:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.3)
        left = time.monotonic()
        while engine.num_running or engine.num_waiting:
            assert time.monotonic() - left < 2, "the request kept generating after its client left"
            time.sleep(0.01)
        metrics = httpx.get(f"{url}/metrics").text
        generated = float(re.search(r"^llmk:generation_tokens_total (\S+)", metrics, re.M).group(1))
        assert generated < 100  # ~15 steps in 0.3 s, 200 if it had run on
        assert 'code="499"' in metrics and 'llmk:request_errors_total{code="499"}' not in metrics


def test_an_abandoned_upload_is_499_not_a_server_error(bert_dir):
    app = create_app(serve_config(bert_dir), model_dir=bert_dir)
    with live_app(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b'POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n{"inp'
            )
            time.sleep(0.2)
        time.sleep(0.3)
        metrics = httpx.get(f"{url}/metrics").text
        assert 'code="499"' in metrics and "request_errors_total{" not in metrics


class Boom(BaseException):
    """Not an Exception: escapes the engine's per-step handler and ends its thread."""


def test_a_dead_engine_is_not_ready_and_answers_503_never_hangs(llama_dir):
    with running_client(llama_dir) as client:
        engine = client.app.state.services.engine

        def explode(step):
            raise Boom("the scheduler died")

        engine.model.forward = explode
        answer = client.post("/v1/completions", json=COMPLETION)
        assert answer.status_code in (500, 503, 504), answer.text
        deadline = time.monotonic() + 5
        while (ready := client.get("/ready")).status_code == 200:
            assert time.monotonic() < deadline, "/ready still says ready"
            time.sleep(0.05)
        assert ready.status_code == 503 and ready.json()["status"] == "unhealthy"
        assert "stopped" in ready.json()["reason"]
        again = client.post("/v1/completions", json=COMPLETION)
        assert again.status_code == 503 and again.headers["Retry-After"]


def test_a_failing_engine_turns_unhealthy_and_recovers(llama_dir):
    with running_client(llama_dir) as client:
        engine = client.app.state.services.engine
        forward = engine.model.forward

        def fail(step):
            raise RuntimeError("CUDA error: device-side assert (simulated)")

        engine.model.forward = fail
        for _ in range(3):
            failed = client.post("/v1/completions", json=COMPLETION)
            assert failed.status_code == 500 and failed.headers["X-Request-ID"]
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "unhealthy"
        assert "failed" in ready.json()["reason"]
        engine.model.forward = forward
        assert client.post("/v1/completions", json=COMPLETION).status_code == 200
        assert client.get("/ready").status_code == 200


def test_a_stuck_engine_answers_504_at_the_http_deadline(llama_dir):
    with running_client(llama_dir, options={"request_timeout_s": 0.5}) as client:
        engine = client.app.state.services.engine
        release = threading.Event()
        forward = engine.model.forward

        def stuck(step):
            release.wait(30)
            return forward(step)

        engine.model.forward = stuck
        try:
            started = time.monotonic()
            answer = client.post("/v1/completions", json=COMPLETION)
            assert answer.status_code == 504, answer.text
            assert time.monotonic() - started < 5
            stream = client.post("/v1/completions", json={**COMPLETION, "stream": True})
            assert "504" in stream.text and "[DONE]" in stream.text
        finally:
            release.set()


# ----------------------------------------------------------------------------- validation and errors


SURROGATE = '"\\ud800"'


@pytest.mark.parametrize(
    ("route", "raw", "field"),
    [
        ("/v1/completions", '{"prompt": %s}', "prompt"),
        ("/v1/completions", '{"prompt": ["ok", %s]}', "prompt"),
        ("/v1/completions", '{"prompt": "ok", "model": %s}', "model"),
        ("/v1/completions", '{"prompt": "ok", "stop": %s}', "stop"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": %s}]}', "messages.0.content"),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}]}',
            "messages.0.content.0.text",
        ),
    ],
)
def test_lone_surrogates_are_refused_naming_the_field(llama_client_for_gate, route, raw, field):
    answer = llama_client_for_gate.post(
        route, content=(raw % SURROGATE).encode(), headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == field and "surrogate" in error["message"]


def test_lone_surrogates_in_encoder_inputs_are_refused(bert_dir):
    with running_client(bert_dir) as client:
        for raw in ('{"input": %s}', '{"input": ["a", %s]}'):
            answer = client.post(
                "/v1/embeddings",
                content=(raw % SURROGATE).encode(),
                headers={"Content-Type": "application/json"},
            )
            assert answer.status_code == 400 and answer.json()["error"]["param"] == "input"


@pytest.fixture(scope="module")
def llama_client_for_gate(llama_dir):
    with running_client(llama_dir) as client:
        yield client


def test_unsupported_openai_fields_are_refused_by_name(llama_client_for_gate):
    client = llama_client_for_gate
    for field, value in [("best_of", 2), ("logprobs", 3), ("echo", True), ("suffix", "x")]:
        answer = client.post("/v1/completions", json={**COMPLETION, field: value})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == field, answer.text
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    tools = [{"type": "function", "function": {"name": "f"}}]
    for field, value in [("tools", tools), ("response_format", {"type": "json_object"}), ("logprobs", True)]:
        answer = client.post("/v1/chat/completions", json={**chat, field: value})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == field, answer.text
    defaults = {"best_of": 1, "echo": False, "logprobs": None, "presence_penalty": 0, "user": "u1"}
    assert client.post("/v1/completions", json={**COMPLETION, **defaults}).status_code == 200
    assert (
        client.post("/v1/chat/completions", json={**chat, "response_format": {"type": "text"}}).status_code
        == 200
    )


def test_stop_strings_are_bounded(llama_client_for_gate):
    answer = llama_client_for_gate.post("/v1/completions", json={**COMPLETION, "stop": ["x" * 513]})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "stop.0"
    answer = llama_client_for_gate.post("/v1/completions", json={**COMPLETION, "stop": ["a"] * 5})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "stop"
    assert (
        llama_client_for_gate.post("/v1/completions", json={**COMPLETION, "stop": ["x" * 512]}).status_code
        == 200
    )


def test_validation_messages_say_what_the_field_must_be(bert_dir):
    with running_client(bert_dir) as client:
        empty = client.post("/v1/embeddings", json={"input": []}).json()["error"]
        assert empty["param"] == "input" and "at least 1 item" in empty["message"]
        assert "str" not in empty["message"].split()[0]
        number = client.post("/v1/embeddings", json={"input": 10}).json()["error"]
        assert (
            number["message"] == "input must be a valid string or a valid list" and number["param"] == "input"
        )
        broken = client.post(
            "/v1/embeddings", content=b'{"input": 10', headers={"Content-Type": "application/json"}
        )
        error = broken.json()["error"]
        assert broken.status_code == 400 and error["param"] is None and "not valid JSON" in error["message"]
        missing = client.post("/v1/embeddings", json={}).json()["error"]
        assert missing["message"] == "input is required" and missing["param"] == "input"


def test_a_500_carries_its_request_id_in_the_answer_and_the_log(bert_dir, caplog):
    with running_client(bert_dir) as client:
        services = client.app.state.services

        def broken(text: str, chars: int) -> str:
            raise RuntimeError("a bug in the preview")

        services.masker.preview = broken
        with caplog.at_level(logging.ERROR, logger="llmkernel.serve"):
            answer = client.post("/v1/embeddings", json={"input": "hello"})
        assert answer.status_code == 500
        request_id = answer.headers["X-Request-ID"]
        assert request_id in answer.json()["error"]["message"]
        assert any(getattr(r, "request_id", None) == request_id for r in caplog.records)


def test_ready_probes_during_warm_up_are_not_request_errors(bert_dir):
    app = create_app(serve_config(bert_dir), model_dir=bert_dir)
    with TestClient(app) as client:
        wait_ready(client)
        text = client.get("/metrics").text
        assert "request_errors_total{" not in text
