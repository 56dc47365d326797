"""A real Prometheus scrapes a real `llmk serve` and a real Alertmanager delivers the alert it fires.

Everything listens on loopback on free ports and stops within a minute: `llmk serve` on a tiny Llama with
API keys and 3 requests per minute per key; Debian's Prometheus with deploy/prometheus/prometheus.yml
(scraping every second with a key of its own, the shipped rule files, and LlmkRateLimiting copied with
`for: 1s` and a threshold of 0); Debian's Alertmanager with deploy/prometheus/alertmanager.yml (group_wait
1 s) whose webhook is a receiver in this test. The test causes rate-limited requests and follows them to
Prometheus' TSDB, the alert firing, and the webhook; it also runs every dashboard expression on the result.
Figures go to stdout (`pytest -s` shows them).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from llmkernel.serve.security import create_key
from tests.conftest import REPO
from tests.deploy.monitoring import (
    GRAFANA_VARIABLES,
    PROMETHEUS_DIR,
    RULE_FILES,
    dashboard_expressions,
    exported_names,
    metric_names,
    program,
)
from tests.serve.conftest import free_port
from tests.serve.test_alerts import Receiver
from tests.tiny_models import make_tiny_llama

BUDGET_S = 60  # every wait below shares this deadline
E2E_ALERT = "LlmkRateLimitingE2E"


def wait_for(what: str, check: Callable[[], Any], deadline: float, processes: dict) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` (and any process that died)."""
    while time.monotonic() < deadline:
        for name, process in processes.items():
            assert process.poll() is None, f"{name} exited with {process.returncode}; see its log"
        with contextlib.suppress(httpx.TransportError):
            if result := check():
                return result
        time.sleep(0.05)
    raise TimeoutError(f"gave up waiting for {what} after {BUDGET_S} s")


@contextlib.contextmanager
def started(processes: dict, name: str, args: list[str], log: Path, **kwargs: Any) -> Iterator[None]:
    with log.open("w") as out:
        processes[name] = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, **kwargs)
    try:
        yield
    finally:
        process = processes.pop(name)
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def prometheus_config(tmp_path: Path, server: int, alertmanager: int, key_file: Path) -> Path:
    """deploy/prometheus/prometheus.yml pointed at this test's ports and key, evaluating every second."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    job = config["scrape_configs"][0]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{server}"]}]
    job["authorization"]["credentials_file"] = str(key_file)
    config["alerting"]["alertmanagers"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{alertmanager}"]}]
    shipped = yaml.safe_load(RULE_FILES[0].read_text())["groups"][0]["rules"]
    rule = next(rule for rule in shipped if rule["alert"] == "LlmkRateLimiting")
    quick = {**rule, "alert": E2E_ALERT, "for": "1s", "expr": re.sub(r">\s*[\d.]+$", "> 0", rule["expr"])}
    assert quick["expr"] != rule["expr"]
    (tmp_path / "e2e-rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "e2e", "rules": [quick]}]}))
    config["rule_files"] = [*map(str, RULE_FILES), str(tmp_path / "e2e-rules.yml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def alertmanager_config(tmp_path: Path, webhook: str) -> Path:
    """deploy/prometheus/alertmanager.yml sending to this test's receiver after 1 s instead of 30 s."""
    config = yaml.safe_load((PROMETHEUS_DIR / "alertmanager.yml").read_text())
    config["route"].update(group_wait="1s", group_interval="1s")
    config["receivers"][0]["webhook_configs"][0]["url"] = webhook
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def query(prometheus: str, expr: str) -> list[dict]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert answer["status"] == "success", f"{expr}: {answer}"
    return answer["data"]["result"]


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_prometheus_scrapes_llmk_serve_and_alertmanager_delivers_its_alert(tmp_path):
    prometheus_bin = program("prometheus")
    alertmanager_bin = program("prometheus-alertmanager", "alertmanager")
    model = make_tiny_llama(tmp_path / "tiny-llama")
    keys = tmp_path / "keys.json"
    client_key, _ = create_key(keys, "client")
    scrape_key, _ = create_key(keys, "prometheus")
    key_file = tmp_path / "prometheus.key"
    key_file.write_text(scrape_key + "\n")
    ports = {name: free_port() for name in ("server", "prometheus", "alertmanager")}
    server = f"http://127.0.0.1:{ports['server']}"
    prometheus = f"http://127.0.0.1:{ports['prometheus']}"
    auth = {"Authorization": f"Bearer {client_key}"}
    serve_args = [sys.executable, "-m", "llmkernel.cli", "serve", str(model), "--port", str(ports["server"])]
    serve_args += ["--api_keys", str(keys), "--requests_per_minute", "3", "--max_tokens", "8"]
    processes: dict[str, subprocess.Popen] = {}
    began = time.monotonic()
    deadline = began + BUDGET_S
    with contextlib.ExitStack() as stack:
        receiver = stack.enter_context(Receiver())
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        stack.enter_context(started(processes, "llmk serve", serve_args, tmp_path / "serve.log", env=env))
        prometheus_args = [
            prometheus_bin,
            f"--config.file={prometheus_config(tmp_path, ports['server'], ports['alertmanager'], key_file)}",
            f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
        ]
        stack.enter_context(started(processes, "prometheus", prometheus_args, tmp_path / "prometheus.log"))
        alertmanager_args = [
            alertmanager_bin,
            f"--config.file={alertmanager_config(tmp_path, receiver.url)}",
            f"--storage.path={tmp_path / 'alertmanager-data'}",
            f"--web.listen-address=127.0.0.1:{ports['alertmanager']}",
            "--cluster.listen-address=",  # no gossip port: one Alertmanager, loopback only
        ]
        stack.enter_context(started(processes, "alertmanager", alertmanager_args, tmp_path / "am.log"))
        try:
            ready = lambda: httpx.get(f"{server}/ready", headers=auth, timeout=2).status_code == 200  # noqa: E731
            wait_for("llmk serve /ready", ready, deadline, processes)
            up = lambda: [r for r in query(prometheus, 'up{job="llmk-serve"}') if r["value"][1] == "1"]  # noqa: E731
            wait_for("Prometheus to scrape llmk serve (up == 1)", up, deadline, processes)
            scraped_up = time.monotonic()

            # cause it: one completion and /v1/models until the key's 3 requests a minute are spent
            completion = {"prompt": "hello", "max_tokens": 4}
            assert httpx.post(
                f"{server}/v1/completions", json=completion, headers=auth, timeout=30
            ).is_success
            codes = [httpx.get(f"{server}/v1/models", headers=auth, timeout=5).status_code for _ in range(6)]
            limited = codes.count(429)
            assert codes[:2] == [200, 200] and limited == 4, codes
            caused = time.monotonic()

            value = f'llmk:rate_limited_total{{job="llmk-serve"}} == {limited}'
            wait_for(f"Prometheus to hold {value}", lambda: query(prometheus, value), deadline, processes)
            stored = time.monotonic()

            def firing() -> bool:
                alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
                return any(a["labels"]["alertname"] == E2E_ALERT and a["state"] == "firing" for a in alerts)

            wait_for(f"{E2E_ALERT} to fire in Prometheus", firing, deadline, processes)
            fired = time.monotonic()

            def delivered() -> list[dict]:
                return [
                    alert
                    for body in receiver.received
                    for alert in body["alerts"]
                    if alert["labels"]["alertname"] == E2E_ALERT and alert["status"] == "firing"
                ]

            notified = wait_for(
                "Alertmanager to POST the alert to the webhook", delivered, deadline, processes
            )
            webhook_at = time.monotonic()

            # the shipped rules load and evaluate on live data without error, and a healthy server fires none
            groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
            rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
            assert {"llmk-serve", "llmk-availability", "e2e"} <= {group["name"] for group in groups}
            assert all(rule["health"] == "ok" for rule in rules.values()), rules
            assert [name for name, rule in rules.items() if rule["state"] == "firing"] == [E2E_ALERT]

            # every dashboard expression runs on Prometheus; those over sampled metrics return series
            metrics_body = httpx.get(f"{server}/metrics", headers=auth, timeout=5).text
            _, sampled = exported_names(metrics_body)
            empty = []
            for expr in dashboard_expressions():
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                if not query(prometheus, expr) and metric_names(expr) <= sampled | {"up"}:
                    empty.append(expr)
            assert empty == []
            scrapes = query(prometheus, 'count_over_time(up{job="llmk-serve"}[5m])')[0]["value"][1]
            scrapes_ok = query(prometheus, 'sum_over_time(up{job="llmk-serve"}[5m])')[0]["value"][1]
            limited_seen = query(prometheus, 'llmk:rate_limited_total{job="llmk-serve"}')[0]["value"][1]
        except BaseException:
            for name in ("serve.log", "prometheus.log", "am.log"):
                print(f"----- {name}\n{(tmp_path / name).read_text()[-3000:]}")
            raise
    stopped = time.monotonic()
    assert notified[0]["annotations"]["summary"] == rule_summary()
    assert float(limited_seen) == limited
    figures = {
        "first_scrape_up_s": round(scraped_up - began, 2),
        "cause_to_stored_s": round(stored - caused, 2),
        "cause_to_firing_s": round(fired - caused, 2),
        "cause_to_webhook_s": round(webhook_at - caused, 2),
        "scrapes": int(scrapes),
        "scrapes_up": int(float(scrapes_ok)),
        "rate_limited": limited,
        "webhook_posts": len(receiver.received),
        "wall_s": round(stopped - began, 2),
    }
    print(json.dumps({"monitoring_e2e": figures}))


def rule_summary() -> str:
    shipped = yaml.safe_load(RULE_FILES[0].read_text())["groups"][0]["rules"]
    return next(rule for rule in shipped if rule["alert"] == "LlmkRateLimiting")["annotations"]["summary"]
