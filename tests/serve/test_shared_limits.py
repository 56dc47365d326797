"""Rate limits shared in Redis (`--rate_limit_backend`, serve/limits.py), against a real redis-server on
loopback: the Lua bucket answers as the in-process TokenBucket does, servers sharing a backend refuse what
one server alone refuses, and a Redis that goes away leaves the servers serving on their own limiters
(one warning, `llmk:rate_limit_backend_up` 0) until it returns."""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from llmkernel.cli import main
from llmkernel.errors import ConfigError
from llmkernel.serve.config import ServeConfig
from llmkernel.serve.limits import SharedRateLimiter
from llmkernel.serve.security import RateLimiter
from tests.serve.conftest import free_port, running_client

redis = pytest.importorskip(
    "redis", reason="the redis extra is not installed: pip install 'llmkernel[redis]'"
)
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
pytestmark = pytest.mark.skipif(
    not Path(REDIS_SERVER).exists(),
    reason="redis-server is not installed (Debian: apt-get install redis-server, or `make system-packages`)",
)
UP = "llmk:rate_limit_backend_up"


class RedisServer:
    """A throw-away redis-server on a loopback port: no persistence, so a restart starts empty."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            assert self.process.poll() is None, f"redis-server exited (port {self.port} taken?)"
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not answer PING within 10 s"
                time.sleep(0.02)
        client.close()

    def kill(self) -> None:
        """SIGKILL: Redis disappears as a crashed or unplugged one would, without closing connections."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(free_port())
    server.start()
    try:
        yield server
    finally:
        server.kill()


@contextlib.contextmanager
def serve_log() -> Iterator[list[logging.LogRecord]]:
    """The records of the server's logger (set up or not by other tests: server.py stops propagation)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("llmkernel.serve")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def backend_warnings(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.levelno == logging.WARNING and "rate limit backend" in r.msg]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def gauge(text: str) -> str | None:
    """The value of llmk:rate_limit_backend_up in a /metrics page, or None when it is not exported."""
    return next((line.split()[1] for line in text.splitlines() if line.startswith(UP + " ")), None)


# ---------------------------------------------------------------------------------------- the bucket


def test_the_lua_bucket_answers_as_the_in_process_token_bucket(redis_server):
    # 60 units a minute is 1 a second: the milliseconds between the two limiters' calls move a level by
    # ~0.001 of a unit, so every allow/deny compares exactly and every wait to within 0.5 s.
    shared = SharedRateLimiter(redis_server.url, 60, 60)
    local = RateLimiter(60, 60)
    rng = random.Random(15)
    for step in range(300):
        name = rng.choice(["alice", "bob"])
        operation = rng.choice(["request", "reserve", "reserve", "refund", "charge"])
        amount = rng.randint(1, 40)
        answers = []
        for limiter in (shared, local):
            if operation == "request":
                answers.append(limiter.take_request(name))
            elif operation == "reserve":
                answers.append(limiter.reserve_tokens(name, amount))
            elif operation == "refund":
                answers.append(limiter.refund_tokens(name, amount))
            else:
                answers.append(limiter.charge_tokens(name, amount // 4))
        got, expected = answers
        where = f"step {step}: {operation} {amount} for {name}"
        if expected is None:
            assert got is None, where
        else:
            assert (got == 0) == (expected == 0), f"{where}: shared {got}, in-process {expected}"
            assert got == pytest.approx(expected, abs=0.5), where
    assert shared.up
    shared.close()


def test_the_lua_bucket_refills_on_redis_time(redis_server):
    shared = SharedRateLimiter(redis_server.url, 0, 600)  # 10 tokens a second
    assert shared.reserve_tokens("alice", 600) == 0
    assert shared.reserve_tokens("alice", 5) == pytest.approx(0.5, abs=0.05)
    time.sleep(0.6)  # ~6 tokens back
    assert shared.reserve_tokens("alice", 5) == 0
    assert shared.reserve_tokens("alice", 50) > 0
    shared.refund_tokens("alice", 1000)  # capped at the capacity
    assert shared.reserve_tokens("alice", 600) == 0 and shared.reserve_tokens("alice", 10) > 0
    assert shared.take_request("alice") == 0  # no request limit: no round trip, no key
    assert shared.client.exists("llmk:ratelimit:alice:requests") == 0
    shared.close()


def test_buckets_are_namespaced_and_expire_once_they_would_be_full(redis_server):
    shared = SharedRateLimiter(redis_server.url, 6, 600, prefix="team-a:limits")
    shared.take_request("alice")
    shared.reserve_tokens("alice", 600)
    shared.charge_tokens("alice", 300)  # a debt: 900 tokens short of full, 90 s at 10 a second
    keys = sorted(key.decode() for key in shared.client.keys("*"))
    assert keys == ["team-a:limits:alice:requests", "team-a:limits:alice:tokens"]
    assert set(shared.client.hgetall(keys[1])) == {b"tokens", b"updated"}
    assert 10_000 < shared.client.pttl(keys[0]) <= 11_000  # 1 request short: 10 s, plus 1 s
    assert 90_000 < shared.client.pttl(keys[1]) <= 91_000
    shared.close()


def test_a_redis_restart_reloads_the_script(redis_server):
    shared = SharedRateLimiter(redis_server.url, 3, 0)
    assert shared.take_request("alice") == 0
    shared.client.script_flush()  # what a restart does: EVALSHA answers NOSCRIPT, the script is loaded again
    assert [shared.take_request("alice") > 0 for _ in range(3)] == [False, False, True]
    assert shared.up
    shared.close()


# ------------------------------------------------------------------------------------------ the flags


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("localhost:6379", "is not a Redis URL"),
        ("http://127.0.0.1:6379", "is not a Redis URL"),
        ("redis://:6379", "names no host"),
        ("redis://127.0.0.1:port", "is not a URL"),
        ("redis://127.0.0.1:6379/cache", "must be a database number"),
        ("unix://", "names no socket file"),
    ],
)
def test_a_bad_backend_url_is_a_config_error_naming_the_flag(url, says):
    with pytest.raises(ConfigError, match=f"rate_limit_backend: .*{says}"):
        ServeConfig(model="x", rate_limit_backend=url)


def test_a_bad_backend_url_exits_2_in_one_line_without_its_password(capsys):
    code = main(["serve", "some-model", "--rate-limit-backend", "http://:secret@127.0.0.1:6379"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "rate_limit_backend" in err
    assert "secret" not in err and "***@" in err
    for good in (
        "redis://127.0.0.1:6379",
        "rediss://user:pw@redis.example.com:6380/2",
        "unix:///run/redis.sock",
    ):
        ServeConfig(model="x", rate_limit_backend=good)


# ------------------------------------------------------------------------------- servers sharing Redis


def alternate(clients: list, count: int, headers: dict | None = None) -> list:
    """`count` GET /v1/models, sent to each client in turn."""
    return [clients[i % len(clients)].get("/v1/models", headers=headers or {}) for i in range(count)]


def test_two_apps_sharing_a_backend_refuse_what_one_app_alone_refuses(bert_dir, redis_server):
    with running_client(bert_dir, options={"requests_per_minute": 5}) as alone:
        single = [answer.status_code for answer in alternate([alone], 12)]
        assert gauge(alone.get("/metrics").text) is None  # no backend, no gauge
    assert single == [200] * 5 + [429] * 7
    options = {"requests_per_minute": 5, "rate_limit_backend": redis_server.url}
    with running_client(bert_dir, options=options) as a, running_client(bert_dir, options=options) as b:
        answers = alternate([a, b], 12)
        assert [answer.status_code for answer in answers] == single
        for refused in answers[5:]:
            assert refused.headers["Retry-After"] == "12"  # one request refills in 60/5 s
            assert refused.json()["error"]["type"] == "rate_limit_error"
        assert gauge(a.get("/metrics").text) == gauge(b.get("/metrics").text) == "1.0"


def test_redis_going_away_falls_back_to_local_limits_and_comes_back(bert_dir, redis_server):
    options = {"requests_per_minute": 5, "rate_limit_backend": redis_server.url}
    with (
        serve_log() as records,
        running_client(bert_dir, options=options) as a,
        running_client(bert_dir, options=options) as b,
    ):
        for client in (a, b):
            client.app.state.services.limiter.retry_interval_s = 0.1
        assert [r.status_code for r in alternate([a, b], 6)] == [200] * 5 + [429]
        redis_server.kill()
        # each server now has its own full bucket of 5: served although the shared budget is spent
        assert [r.status_code for r in alternate([a, b], 6)] == [200] * 6
        assert gauge(a.get("/metrics").text) == gauge(b.get("/metrics").text) == "0.0"
        warnings = backend_warnings(records)
        assert len(warnings) == 2, warnings  # one per server, not one per request
        assert "does not answer" in warnings[0] and redis_server.url in warnings[0]
        redis_server.start()  # the same port, empty
        wait_for(lambda: a.app.state.services.limiter.up and b.app.state.services.limiter.up, "reconnection")
        assert gauge(a.get("/metrics").text) == gauge(b.get("/metrics").text) == "1.0"
        # shared again: 5 in all (the local buckets, 2 left each, would have let 4 through)
        assert [r.status_code for r in alternate([a, b], 8)] == [200] * 5 + [429] * 3
        assert len(backend_warnings(records)) == 2
        assert sum("answers again" in r.getMessage() for r in records) == 2


def test_an_unreachable_redis_at_start_serves_on_the_local_limiter(bert_dir):
    url = f"redis://127.0.0.1:{free_port()}"  # nothing listens there
    with serve_log() as records:
        started = time.monotonic()
        with running_client(
            bert_dir, options={"requests_per_minute": 2, "rate_limit_backend": url}
        ) as client:
            assert [r.status_code for r in alternate([client], 3)] == [200, 200, 429]
            assert gauge(client.get("/metrics").text) == "0.0"
        assert time.monotonic() - started < 30
    assert len(backend_warnings(records)) == 1


# --------------------------------------------------------------------------------- real `llmk serve`


@pytest.mark.e2e
def test_two_llmk_serve_processes_share_one_budget_through_an_outage(bert_dir, redis_server):
    from tests.serve.test_server import start_llmk_serve, wait_until_ready

    servers = []
    for _ in range(2):
        port = free_port()
        args = [str(bert_dir), "--port", str(port), "--requests_per_minute", "5"]
        process = start_llmk_serve(*args, "--rate-limit-backend", redis_server.url)
        servers.append((process, f"http://127.0.0.1:{port}"))
    try:
        for process, url in servers:
            wait_until_ready(process, url)
        urls = [url for _, url in servers]

        def codes(count: int) -> list[int]:
            return [httpx.get(f"{urls[i % 2]}/v1/models", timeout=10).status_code for i in range(count)]

        def gauges() -> list[str | None]:
            return [gauge(httpx.get(f"{url}/metrics", timeout=10).text) for url in urls]

        assert codes(12) == [200] * 5 + [429] * 7 and gauges() == ["1.0", "1.0"]
        redis_server.kill()
        assert codes(4) == [200] * 4 and gauges() == ["0.0", "0.0"]
        redis_server.start()
        wait_for(lambda: gauges() == ["1.0", "1.0"], "both servers to reconnect", timeout=15)
        assert codes(12) == [200] * 5 + [429] * 7
    finally:
        for process, _ in servers:
            process.terminate()
        for process, _ in servers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            if process.poll() is None:
                process.kill()
    for process, _ in servers:
        logs = process.stderr.read()
        warnings = [line for line in logs.splitlines() if '"message": "rate limit backend' in line]
        warnings = [line for line in warnings if '"level": "warning"' in line]
        assert len(warnings) == 1 and redis_server.url in warnings[0], logs[-3000:]  # the address unmasked
        assert logs.count("answers again") == 1
