"""Alert rules: PromQL-equivalent evaluation, firing after `for_s`, webhook delivery, the shipped files."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from llmkernel.errors import ConfigError
from llmkernel.serve.alerts import (
    AlertEvaluator,
    AlertRule,
    AlertRules,
    histogram_quantile,
    load_rules,
    prometheus_rules,
    redact_url,
)
from llmkernel.serve.metrics import Metrics
from tests.conftest import REPO
from tests.serve.conftest import free_port, running_client, serve_config


class Receiver:
    """A webhook receiver on 127.0.0.1 that keeps the JSON bodies POSTed to it and answers `status`."""

    def __init__(self, status: int = 200) -> None:
        self.status = status

    def __enter__(self) -> Receiver:
        received = self.received = []
        status = self.status

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_histogram_quantile_matches_prometheus():
    # 100 observations: 50 in (0, 1], 40 in (1, 2], 10 in (2, +Inf)
    buckets = [(1.0, 50.0), (2.0, 90.0), (float("inf"), 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(1.0)
    assert histogram_quantile(0.7, buckets) == pytest.approx(1.5)
    assert histogram_quantile(0.95, buckets) == pytest.approx(2.0)  # in +Inf: the highest finite bound
    assert histogram_quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None


def test_rule_fires_after_for_s_resolves_and_posts_to_the_webhook():
    metrics = Metrics()
    now = [0.0]
    rules = AlertRules(
        rules=[
            AlertRule(name="Slow", signal="e2e_request_latency_seconds", above=1.0, window_s=60, for_s=30)
        ],
        interval_s=10,
    )
    with Receiver() as receiver:
        evaluator = AlertEvaluator(rules, metrics.registry, webhook=receiver.url, clock=lambda: now[0])

        def step(latency: float | None) -> list:
            now[0] += 10
            if latency is not None:
                for _ in range(10):
                    metrics.e2e_request_latency.observe(latency)
            return asyncio.run(evaluator.evaluate())

        assert step(None) == []  # one snapshot: no rate yet
        assert step(5.0) == []  # above: pending
        assert step(5.0) == [] and step(5.0) == []
        fired = step(5.0)  # pending for 30 s
        assert [e["status"] for e in fired] == ["firing"] and fired[0]["value"] > 1.0
        assert step(5.0) == []  # fires once
        for _ in range(6):
            events = step(0.01)
            if events:
                break
        assert [e["status"] for e in events] == ["resolved"]
        deadline = time.monotonic() + 5
        while len(receiver.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert [p["status"] for p in receiver.received] == ["firing", "resolved"]
    assert receiver.received[0]["alerts"][0]["labels"]["alertname"] == "Slow"


def test_error_rate_counts_only_server_errors():
    metrics = Metrics()
    now = [0.0]
    rules = AlertRules(rules=[AlertRule(name="Errors", signal="error_rate", above=0.2, window_s=60, for_s=0)])
    evaluator = AlertEvaluator(rules, metrics.registry, clock=lambda: now[0])
    asyncio.run(evaluator.evaluate())
    for code in ["200"] * 6 + ["429"] * 2 + ["500"] * 2:
        metrics.requests.labels("/v1/completions", code).inc()
        if code != "200":
            metrics.request_errors.labels(code).inc()
    now[0] += 15
    assert asyncio.run(evaluator.evaluate()) == []  # 2 of 10: the 429s do not count, 0.2 is not above 0.2
    assert evaluator.states["Errors"].value == pytest.approx(0.2)
    metrics.requests.labels("/v1/completions", "503").inc()
    metrics.request_errors.labels("503").inc()
    now[0] += 15
    assert [e["status"] for e in asyncio.run(evaluator.evaluate())] == ["firing"]  # 3 of 11


def test_bad_rules_name_the_field(tmp_path):
    bad = tmp_path / "rules.yaml"
    bad.write_text("rules:\n  - name: X\n    signal: cpu\n    above: 1\n")
    with pytest.raises(ConfigError, match="signal: must be one of"):
        load_rules(bad)


def test_shipped_prometheus_rules_match_the_server_rules():
    rules = load_rules(REPO / "deploy" / "prometheus" / "llmk-serve-rules.yaml")
    shipped = yaml.safe_load((REPO / "deploy" / "prometheus" / "llmk-alerts.yml").read_text())
    assert shipped == prometheus_rules(rules)
    assert {rule["alert"] for rule in shipped["groups"][0]["rules"]} >= {
        "LlmkHighRequestLatencyP95",
        "LlmkHighServerErrorRate",
    }


def test_server_evaluates_rules_and_calls_the_webhook(tmp_path, bert_dir):
    with Receiver() as receiver:
        rules = tmp_path / "rules.yaml"
        rules.write_text(
            "interval_s: 0.05\nrules:\n  - {name: AnyLatency, signal: e2e_request_latency_seconds, "
            "above: 0.0, window_s: 60, for_s: 0}\n"
        )
        config = serve_config(bert_dir, alerts=str(rules), alert_webhook=receiver.url)
        with running_client(bert_dir, config=config) as client:
            assert client.post("/v1/embeddings", json={"input": "hello"}).status_code == 200
            deadline = time.monotonic() + 10
            while not receiver.received and time.monotonic() < deadline:
                time.sleep(0.02)
    assert receiver.received and receiver.received[0]["alerts"][0]["labels"]["alertname"] == "AnyLatency"


def test_redact_url_keeps_only_scheme_host_and_port():
    assert redact_url("https://hooks.slack.com/services/T0/B0/s3cret?token=x#y") == "https://hooks.slack.com"
    assert redact_url("http://user:pass@127.0.0.1:9093/hook") == "http://127.0.0.1:9093"
    assert redact_url("http://[::1]:8080/alert?key=k") == "http://[::1]:8080"
    assert redact_url("not a url") == "<invalid URL>" and redact_url("http://host:99999/x") == "<invalid URL>"


SECRET_PATH = "/services/T000/B000/s3cr3t-path"
SECRET_QUERY = "token=hunter2"


def failed_webhook_lines(url: str, caplog) -> list[dict]:
    """Fire one alert at `url`; the alert_webhook_failed log lines, parsed."""
    rules = AlertRules(rules=[AlertRule(name="Always", signal="num_requests_waiting", above=-1, for_s=0)])
    evaluator = AlertEvaluator(rules, Metrics().registry, webhook=url)
    with caplog.at_level(logging.INFO, logger="llmkernel.serve.alerts"):
        caplog.clear()
        assert [event["status"] for event in asyncio.run(evaluator.evaluate())] == ["firing"]
    messages = [json.loads(r.getMessage()) for r in caplog.records if r.name == "llmkernel.serve.alerts"]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "s3cr3t" not in text and "hunter2" not in text and "/services" not in text
    return [m for m in messages if m["event"] == "alert_webhook_failed"]


def test_a_failing_webhook_is_logged_without_its_path_or_query(caplog):
    with Receiver(status=500) as receiver:
        host = receiver.url.removesuffix("/hook")
        [line] = failed_webhook_lines(f"{host}{SECRET_PATH}?{SECRET_QUERY}", caplog)
        assert receiver.received  # it was POSTed, and answered 500
    assert line["webhook"] == host and line["error"] == "HTTP 500 Internal Server Error"


def test_an_unreachable_webhook_is_logged_without_its_path_or_query(caplog):
    url = f"http://127.0.0.1:{free_port()}{SECRET_PATH}?{SECRET_QUERY}"  # nothing listens there
    [line] = failed_webhook_lines(url, caplog)
    assert line["webhook"] == url.split("/services")[0] and line["error"].startswith("ConnectError")
