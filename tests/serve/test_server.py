"""The real `llmk serve` process: SIGTERM drains (503 for new requests, in-flight ones finish, exit 0);
a model that cannot load is reported on /ready; config errors are one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from llmkernel.errors import ConfigError
from llmkernel.serve.app import create_app
from llmkernel.serve.config import ServeConfig
from tests.conftest import REPO
from tests.serve.conftest import free_port, serve_config


def start_llmk_serve(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "llmkernel.cli", "serve", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until_ready(process: subprocess.Popen, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-2000:]
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise TimeoutError(f"llmk serve did not become ready on {url}")


def test_sigterm_drains_in_flight_requests_and_exits_0(bert_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # a 1 s batching window keeps the first request in flight while SIGTERM arrives
    process = start_llmk_serve(str(bert_dir), "--port", str(port), "--batch_window_ms", "1000")
    try:
        wait_until_ready(process, url)
        in_flight: dict = {}

        def slow_request() -> None:
            in_flight["answer"] = httpx.post(f"{url}/v1/embeddings", json={"input": "hello"}, timeout=30)

        thread = threading.Thread(target=slow_request)
        thread.start()
        time.sleep(0.4)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        refused = httpx.post(f"{url}/v1/embeddings", json={"input": "late"}, timeout=10)
        ready = httpx.get(f"{url}/ready", timeout=10)
        thread.join(timeout=30)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    stderr = process.stderr.read()
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    assert in_flight["answer"].status_code == 200
    assert code == 0, stderr[-2000:]
    logs = [json.loads(line) for line in stderr.splitlines() if line.startswith('{"event": "request"')]
    assert {(entry["route"], entry["status"]) for entry in logs} >= {
        ("/v1/embeddings", 200),
        ("/v1/embeddings", 503),
    }


def test_a_model_that_cannot_load_is_reported_on_ready(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    app = create_app(serve_config(tmp_path), model_dir=tmp_path)
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while (answer := client.get("/ready")).json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert answer.status_code == 503 and answer.json()["status"] == "failed"
        assert "cannot load the model" in app.state.services.load_error
        assert client.post("/v1/embeddings", json={"input": "x"}).status_code == 503


def test_config_errors_name_the_flag():
    with pytest.raises(ConfigError, match="pii_mask: must be one of"):
        ServeConfig(model="x", pii_mask="everything")
    with pytest.raises(ConfigError, match="model: a model folder"):
        ServeConfig(model="")


def test_error_logs_are_masked_but_info_lines_keep_addresses():
    import logging

    from llmkernel.serve.logs import JsonLines, MaskPii
    from llmkernel.serve.security import PiiMasker

    mask, formatter = MaskPii(PiiMasker(["email", "ip"])), JsonLines()
    try:
        raise ValueError("cannot tokenize 'mail bob@example.org now'")
    except ValueError as error:
        failed = logging.LogRecord(
            "uvicorn.error", logging.ERROR, "", 0, "failed on %s", ("bob@example.org",), None
        )
        failed.exc_info = (type(error), error, error.__traceback__)
    started = logging.LogRecord(
        "uvicorn.error", logging.INFO, "", 0, "running on http://127.0.0.1:8000", (), None
    )
    lines = [formatter.format(record) for record in (failed, started) if mask.filter(record)]
    assert "bob@example.org" not in lines[0] and "<EMAIL>" in json.loads(lines[0])["error"]
    assert "127.0.0.1:8000" in lines[1]


def test_every_logger_under_the_handler_is_masked(capsys):
    import logging

    from llmkernel.serve.logs import setup_logging

    setup_logging(["email"])
    logging.getLogger("llmkernel.serve.routes").error("a request from bob@example.org failed")
    logging.getLogger("uvicorn.error").warning("client carol@example.org sent garbage")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all("example.org" not in line and "<EMAIL>" in line for line in lines)


def test_a_port_in_use_is_one_line_and_exit_2(bert_dir):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        process = start_llmk_serve(str(bert_dir), "--port", str(port))
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr[-2000:]
    assert f"port {port} on 127.0.0.1 is in use" in stderr and "<IP_ADDRESS>" not in stderr
    assert "serving" not in stderr and "Traceback" not in stderr


def test_serving_without_keys_off_loopback_warns_loudly(bert_dir):
    port = free_port()
    process = start_llmk_serve(str(bert_dir), "--host", "0.0.0.0", "--port", str(port))
    try:
        wait_until_ready(process, f"http://127.0.0.1:{port}")
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    warning = next(json.loads(line) for line in stderr.splitlines() if "WITHOUT API keys" in line)
    assert warning["level"] == "warning" and "0.0.0.0" in warning["message"]
