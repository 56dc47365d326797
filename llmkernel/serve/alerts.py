"""Threshold alerts over the server's own metrics, evaluated in the server, and the same rules for Prometheus.

A rules file (`llmk serve --alerts rules.yaml`):

    webhook: http://127.0.0.1:9093/hook   # optional; --alert_webhook overrides it
    interval_s: 5                         # how often the rules are evaluated
    rules:
      - name: LlmkHighLatencyP95
        signal: e2e_request_latency_seconds   # one of SIGNALS below
        quantile: 0.95                        # for the two latency signals
        above: 5.0
        window_s: 300                         # the range of rate() / max_over_time()
        for_s: 60                             # how long it must hold before the alert fires
        severity: warning
        summary: p95 request latency is above 5 s

Every `interval_s` the evaluator snapshots the registry; a windowed value compares the newest snapshot with
the one `window_s` ago, as PromQL's rate() does (histogram quantiles interpolate inside buckets like
histogram_quantile). A rule that stays above its threshold for `for_s` fires: one JSON log line and, if a
webhook is set, a POST in Alertmanager's webhook format (logs name the webhook as scheme://host:port only,
as its path or query often holds a token); it resolves the same way. `prometheus_rules()`
turns the same file into Prometheus alerting rules; `deploy/prometheus/llmk-alerts.yml` is that output for
`deploy/prometheus/llmk-serve-rules.yaml` (`python -m llmkernel.serve.alerts FILE` regenerates it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from prometheus_client import CollectorRegistry

from llmkernel.config import build, check, load_yaml, option
from llmkernel.errors import ConfigError, first_line

ALERT_LOGGER = "llmkernel.serve.alerts"

# signal -> PromQL with {w} for the window and {q} for the quantile
SIGNALS = {
    "e2e_request_latency_seconds": (
        "histogram_quantile({q}, sum by (le) (rate(llmk:e2e_request_latency_seconds_bucket[{w}])))"
    ),
    "time_to_first_token_seconds": (
        "histogram_quantile({q}, sum by (le) (rate(llmk:time_to_first_token_seconds_bucket[{w}])))"
    ),
    "error_rate": (
        'sum(rate(llmk:request_errors_total{{code=~"5.."}}[{w}])) / sum(rate(llmk:requests_total[{w}]))'
    ),
    "rate_limited_per_second": "sum(rate(llmk:rate_limited_total[{w}]))",
    "num_requests_waiting": "max_over_time(llmk:num_requests_waiting[{w}])",
}


@dataclass
class AlertRule:
    """One threshold rule: `signal` above `above` for `for_s` seconds."""

    name: str = option(help="alert name (Prometheus `alert`)")
    signal: str = option(help="one of " + ", ".join(SIGNALS))
    above: float = option(help="fires while the signal is above this")
    quantile: float = option(0.95, "quantile for the latency signals")
    window_s: float = option(300.0, "range of rate() and max_over_time(), seconds")
    for_s: float = option(60.0, "how long the condition must hold before firing, seconds")
    severity: str = option("warning", "label attached to the alert")
    summary: str = option("", "one-line description for the log line and the webhook")

    def __post_init__(self) -> None:
        check(bool(self.name), "name", "every rule needs a name")
        check(self.signal in SIGNALS, "signal", f"must be one of {', '.join(SIGNALS)}, got {self.signal!r}")
        check(0 < self.quantile < 1, "quantile", "must be between 0 and 1")
        check(self.window_s > 0 and self.for_s >= 0, "window_s", "window_s must be > 0 and for_s >= 0")


@dataclass
class AlertRules:
    """A rules file: where to send firing alerts, how often to evaluate, and the rules."""

    rules: list[AlertRule] = option(help="the rules", factory=list)
    webhook: str | None = option(None, "URL that firing and resolved alerts are POSTed to")
    interval_s: float = option(5.0, "seconds between evaluations")

    def __post_init__(self) -> None:
        check(self.interval_s > 0, "interval_s", "must be > 0")
        names = [rule.name for rule in self.rules]
        check(len(names) == len(set(names)), "rules", "rule names must be unique")


def load_rules(path: str | Path) -> AlertRules:
    """Read and validate a rules file; ConfigError lines name the file and the field."""
    try:
        return build(AlertRules, load_yaml(path))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def _duration(seconds: float) -> str:
    """A PromQL duration: 300 -> "5m", 90 -> "90s"."""
    whole = int(seconds)
    return f"{whole // 60}m" if whole and whole % 60 == 0 else f"{whole}s"


def prometheus_rules(rules: AlertRules, group: str = "llmk-serve") -> dict[str, Any]:
    """The rules as a Prometheus alerting-rules file (one group)."""
    out = []
    for rule in rules.rules:
        expr = SIGNALS[rule.signal].format(w=_duration(rule.window_s), q=rule.quantile)
        summary = rule.summary or f"{rule.signal} above {rule.above}"
        out.append(
            {
                "alert": rule.name,
                "expr": f"{expr} > {rule.above}",
                "for": _duration(rule.for_s),
                "labels": {"severity": rule.severity},
                "annotations": {"summary": summary},
            }
        )
    return {"groups": [{"name": group, "rules": out}]}


# --------------------------------------------------------------------------------------- evaluation

Snapshot = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def snapshot(registry: CollectorRegistry) -> Snapshot:
    """Every sample of `registry` keyed by (name, sorted labels)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for metric in registry.collect()
        for sample in metric.samples
    }


def _sum(snap: Snapshot, name: str, where: Callable[[dict[str, str]], bool] = lambda labels: True) -> float:
    return sum(value for (n, labels), value in snap.items() if n == name and where(dict(labels)))


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over (upper bound, cumulative count) pairs, +Inf last."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):  # in the overflow bucket: the highest finite bound, as Prometheus does
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(
                count - lower_count, 1e-12
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def _quantile(new: Snapshot, old: Snapshot, metric: str, q: float) -> float | None:
    name = f"{metric}_bucket"
    bounds = sorted({float(dict(labels)["le"]) for (n, labels) in new if n == name})

    def count(snap: Snapshot, bound: float) -> float:
        return _sum(snap, name, lambda labels: float(labels["le"]) == bound)

    return histogram_quantile(q, [(b, count(new, b) - count(old, b)) for b in bounds])


def signal_value(rule: AlertRule, history: list[tuple[float, Snapshot]]) -> float | None:
    """The rule's signal over its window, from (time, snapshot) pairs oldest first; None without data."""
    now, new = history[-1]
    in_window = [(t, snap) for t, snap in history if t >= now - rule.window_s]
    _, old = in_window[0]
    if rule.signal == "num_requests_waiting":
        return max(_sum(snap, "llmk:num_requests_waiting") for _, snap in in_window)
    if len(in_window) < 2:
        return None  # rate() needs two samples in the window
    elapsed = now - in_window[0][0]
    if rule.signal in ("e2e_request_latency_seconds", "time_to_first_token_seconds"):
        return _quantile(new, old, f"llmk:{rule.signal}", rule.quantile)
    if rule.signal == "error_rate":
        requests = _sum(new, "llmk:requests_total") - _sum(old, "llmk:requests_total")
        server_errors = lambda labels: labels["code"].startswith("5")  # noqa: E731
        errors = _sum(new, "llmk:request_errors_total", server_errors)
        errors -= _sum(old, "llmk:request_errors_total", server_errors)
        return errors / requests if requests > 0 else None
    limited = _sum(new, "llmk:rate_limited_total") - _sum(old, "llmk:rate_limited_total")
    return limited / elapsed if elapsed > 0 else None


@dataclass
class _RuleState:
    pending_since: float | None = None
    firing: bool = False
    value: float | None = None
    started: str = ""


@dataclass
class AlertEvaluator:
    """Evaluates `rules` over `registry` every `rules.interval_s`; logs and POSTs firing/resolved alerts."""

    rules: AlertRules
    registry: CollectorRegistry
    webhook: str | None = None
    clock: Callable[[], float] = time.monotonic
    history: deque = field(default_factory=deque)
    states: dict[str, _RuleState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.webhook = self.webhook or self.rules.webhook
        self.log = logging.getLogger(ALERT_LOGGER)
        self.states = {rule.name: _RuleState() for rule in self.rules.rules}

    async def run(self) -> None:
        """Evaluate forever (a task of the app's lifespan)."""
        while True:
            await self.evaluate()
            await asyncio.sleep(self.rules.interval_s)

    async def evaluate(self) -> list[dict[str, Any]]:
        """Take a snapshot, update every rule; returns the notifications sent this time."""
        now = self.clock()
        self.history.append((now, snapshot(self.registry)))
        longest = max((rule.window_s for rule in self.rules.rules), default=0) + self.rules.interval_s
        while self.history and self.history[0][0] < now - longest:
            self.history.popleft()
        sent = []
        for rule in self.rules.rules:
            event = self._update(rule, self.states[rule.name], now)
            if event is not None:
                sent.append(event)
                await self._notify(event)
        return sent

    def _update(self, rule: AlertRule, state: _RuleState, now: float) -> dict[str, Any] | None:
        state.value = signal_value(rule, list(self.history))
        if state.value is not None and state.value > rule.above:
            state.pending_since = now if state.pending_since is None else state.pending_since
            if not state.firing and now - state.pending_since >= rule.for_s:
                state.firing = True
                state.started = datetime.now(UTC).isoformat()
                return self._event(rule, state, "firing")
            return None
        state.pending_since = None
        if state.firing:
            state.firing = False
            return self._event(rule, state, "resolved")
        return None

    def _event(self, rule: AlertRule, state: _RuleState, status: str) -> dict[str, Any]:
        return {
            "status": status,
            "labels": {"alertname": rule.name, "severity": rule.severity},
            "annotations": {"summary": rule.summary or f"{rule.signal} above {rule.above}"},
            "value": state.value,
            "threshold": rule.above,
            "startsAt": state.started,
        }

    async def _notify(self, event: dict[str, Any]) -> None:
        self.log.warning(json.dumps({"event": "alert", **event}))
        if not self.webhook:
            return
        import httpx

        payload = {"version": "4", "status": event["status"], "receiver": "llmk", "alerts": [event]}
        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                (await client.post(self.webhook, json=payload)).raise_for_status()
        except (httpx.HTTPError, httpx.InvalidURL) as error:  # a broken receiver must not stop the evaluator
            failure = {"event": "alert_webhook_failed", "webhook": redact_url(self.webhook)}
            self.log.error(json.dumps({**failure, "error": _describe(error)}))


def redact_url(url: str) -> str:
    """scheme://host[:port] of `url`: a webhook URL often holds a secret in its path, query or user part,
    so logs show only where it points."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:  # an unparsable port or bracket
        return "<invalid URL>"
    if not parts.scheme or not host:
        return "<invalid URL>"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")


def _describe(error: Exception) -> str:
    """One line about a failed POST without the URL (httpx quotes it whole in its messages)."""
    import httpx

    if isinstance(error, httpx.HTTPStatusError):
        return f"HTTP {error.response.status_code} {error.response.reason_phrase}".strip()
    text = f"{type(error).__name__}: {first_line(error)}"
    return _URL.sub(lambda match: redact_url(match.group()), text)


if __name__ == "__main__":  # python -m llmkernel.serve.alerts RULES.yaml > llmk-alerts.yml
    rules = load_rules(sys.argv[1])
    header = (
        f"# Generated from {sys.argv[1]} by `python -m llmkernel.serve.alerts`; edit that file instead.\n"
    )
    print(header + yaml.safe_dump(prometheus_rules(rules), sort_keys=False, width=200), end="")
