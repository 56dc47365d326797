"""`llmk serve --backend ray` on a local Ray instance (`-m e2e`): the CLI serves and stops on SIGTERM;
replicas are added under load and removed after it (short look-back and delays, as Ray's own autoscaling
tests use); a replica killed under load loses no request that had not started. Each test prints what it saw
(replica counts over time; requests sent, answered and failed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from llmkernel.serve.config import ServeConfig
from tests.conftest import REPO
from tests.serve.conftest import free_port

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'llmkernel[ray]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ray[serve]')")
from llmkernel.serve import ray_backend  # noqa: E402

pytestmark = pytest.mark.e2e
BODY = {"prompt": "hello world", "max_tokens": 48}


def _wait(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url}/health did not answer within {timeout} s")


def test_llmk_serve_backend_ray_serves_and_stops_on_sigterm(llama_dir):
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmkernel.cli",
            "serve",
            str(llama_dir),
            "--backend",
            "ray",
            "--port",
            str(port),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(url)
        answer = httpx.post(f"{url}/v1/completions", json=BODY, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 48
        assert httpx.get(f"{url}/v1/models", headers={"Host": "evil.example"}).status_code == 403  # the gate
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output[-3000:]
    assert "on Ray Serve at http://127.0.0.1:" in output and "shutting down Ray Serve" in output


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    serve.shutdown()
    ray.shutdown()


def _config(model: Path, **overrides) -> ServeConfig:
    defaults = {"port": free_port(), "backend": "ray", "replica_cpus": 0.5, "max_tokens": 64}
    return ServeConfig(model=str(model), **{**defaults, **overrides})


class Load:
    """`clients` threads sending completions in a loop until `stop()`; counts sent, answered, failed."""

    def __init__(self, url: str, clients: int) -> None:
        self.url, self.sent, self.answered, self.failed = url, 0, 0, []
        self.lock, self.running = threading.Lock(), True
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def _client(self) -> None:
        with httpx.Client(timeout=60) as client:
            while self.running:
                with self.lock:
                    self.sent += 1
                started = time.monotonic()
                try:
                    ok = client.post(f"{self.url}/v1/completions", json=BODY).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with self.lock:
                    if ok:
                        self.answered += 1
                    else:
                        self.failed.append(started)

    def stop(self) -> None:
        self.running = False
        for thread in self.threads:
            thread.join(timeout=60)


def _timeline(
    seconds: float, start: float, until: Callable[[int], bool] | None = None, every: float = 0.5
) -> list[tuple[float, int]]:
    """(time since `start`, running replicas) every `every` seconds for `seconds`, or until
    `until(running)` holds (the autoscaler's pace depends on how loaded the machine is)."""
    seen, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        running = ray_backend.replica_counts().get("RUNNING", 0)
        seen.append((round(time.monotonic() - start, 1), running))
        if until is not None and until(running):
            break
        time.sleep(every)
    return seen


def test_replicas_are_added_under_load_and_removed_after_it(local_ray, llama_dir):
    config = _config(llama_dir, min_replicas=1, max_replicas=3, target_ongoing_requests=1)
    config = ServeConfig(
        **{**config.__dict__, "upscale_delay_s": 1, "downscale_delay_s": 3, "look_back_period_s": 2}
    )
    url = ray_backend.start(config)
    start = time.monotonic()
    assert ray_backend.replica_counts() == {"RUNNING": 1}
    load = Load(url, clients=6)
    under_load = _timeline(90, start, until=lambda running: running >= 2)
    load.stop()
    after = _timeline(60, start, until=lambda running: running == 1)
    serve.shutdown()  # the next test starts Serve on a port of its own
    print(f"\nreplicas over time (s, running): {under_load + after}")
    print(f"requests: {load.sent} sent, {load.answered} answered, {len(load.failed)} failed")
    assert max(count for _, count in under_load) >= 2  # added under load
    assert after[-1][1] == 1  # back to --min_replicas after it
    assert load.failed == [] and load.answered == load.sent


def test_a_replica_killed_under_load_loses_no_request_that_had_not_started(local_ray, llama_dir):
    config = _config(llama_dir, min_replicas=2, max_replicas=2)
    url = ray_backend.start(config)
    load = Load(url, clients=6)
    time.sleep(4)
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "LlmkReplica" in a["name"]]
    assert len(replicas) == 2
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    answered_at_kill = load.answered
    timeline = _timeline(25, killed_at)
    load.stop()
    serve.shutdown()  # the next test starts Serve on a port of its own
    print(f"\nafter the kill (s, running replicas): {timeline}")
    print(f"requests: {load.sent} sent, {load.answered} answered, {len(load.failed)} failed")
    assert load.answered > answered_at_kill + 20  # the other replica kept answering
    assert timeline[-1][1] == 2  # and Ray Serve replaced the killed one
    # only requests already in flight on the killed replica can fail: those started before the kill
    assert all(started <= killed_at for started in load.failed)
    assert len(load.failed) <= 6
    assert load.sent - load.answered - len(load.failed) <= 6  # at most the clients' last, unfinished ones
