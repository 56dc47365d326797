"""Prometheus metrics (named as vLLM names them, under `llmk:`) and one JSON log line per request.

Each app gets its own `CollectorRegistry`, so tests can build many apps in one process and /metrics shows
only this server's numbers. `RequestObserver` is the outermost middleware: it gives every request an id
(returned as `X-Request-ID`), answers 503 while the server drains, counts requests and errors, and writes
the request's log line when the response has been sent (for a stream: after its last chunk).

With `--rate_limit_backend` (limits.py), `llmk:rate_limit_backend_up` is 1 while the rate limits are
shared in Redis and 0 while this server falls back to its own (Redis does not answer); without a backend
the gauge is not exported, since there is nothing to be up.

A log line holds the request id, method, route, status, latency, the key's *name*, token counts and a
preview of the prompt with PII masked; never the key, the raw prompt, the client address or the output.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llmkernel.serve.schemas import CLIENT_GONE, ApiError

ACCESS_LOGGER = "llmkernel.serve.access"
log = logging.getLogger("llmkernel.serve")

# Seconds; fine at the low end, where CPU encoders and first tokens land, up to the 10-minute timeout.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40)
# Routes that stay open while draining: probes and scrapes must see the server go down.
ALWAYS_OPEN = ("/health", "/ready", "/metrics")
# Answers that are not request errors: a probe saying "not ready" is its job, and 499 (the client left
# before the answer) is the client's doing; neither may feed the error-rate alert.
PROBES = ("/health", "/ready")


class Metrics:
    """The server's metrics in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.num_requests_running = Gauge(
            "llmk:num_requests_running", "requests in a forward pass", registry=r
        )
        self.num_requests_waiting = Gauge(
            "llmk:num_requests_waiting", "requests queued for the model", registry=r
        )
        self.time_to_first_token = Histogram(
            "llmk:time_to_first_token_seconds",
            "submit to first generated token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.e2e_request_latency = Histogram(
            "llmk:e2e_request_latency_seconds",
            "arrival to last byte of successful /v1 model requests",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("llmk:prompt_tokens", "prompt (input) tokens processed", registry=r)
        self.generation_tokens = Counter("llmk:generation_tokens", "tokens generated", registry=r)
        self.requests = Counter("llmk:requests", "HTTP requests answered", ["route", "code"], registry=r)
        self.request_errors = Counter(
            "llmk:request_errors", "answers with status >= 400", ["code"], registry=r
        )
        self.rate_limited = Counter("llmk:rate_limited", "requests refused with 429", registry=r)
        self.connections_refused = Counter(
            "llmk:connections_refused",
            "connections closed before a request: over --limit_concurrency (429) or headers too slow (408)",
            ["code"],
            registry=r,
        )

    def track_rate_limit_backend(self) -> Gauge:
        """The gauge of limits.py's SharedRateLimiter, registered only when a backend is set (a constant 0
        on every server without one would read as an outage)."""
        return Gauge(
            "llmk:rate_limit_backend_up",
            "1 while rate limits are shared in Redis (--rate_limit_backend), 0 while this server limits alone",
            registry=self.registry,
        )

    def track_load(self, running: Callable[[], float], waiting: Callable[[], float]) -> None:
        """Read the running/waiting gauges from the model at scrape time."""
        self.num_requests_running.set_function(running)
        self.num_requests_waiting.set_function(waiting)


class Lifecycle:
    """Whether the server is loading, ready, failed or draining, and how many requests are in flight."""

    def __init__(self) -> None:
        self.status = "loading"  # -> ready | failed; -> draining on SIGTERM
        self.in_flight = 0

    @property
    def draining(self) -> bool:
        return self.status == "draining"


class RequestObserver:
    """Outermost middleware: request ids, drain refusals, request/error counters and the access log."""

    def __init__(
        self,
        app: Any,
        metrics: Metrics,
        lifecycle: Lifecycle,
        mask: Callable[[str], str],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.mask = mask
        self.clock = clock
        self.log = logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = self.clock()
        request_id = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status: int | None = None
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        if self.lifecycle.draining and scope["path"] not in ALWAYS_OPEN:
            error = ApiError(
                503, "the server is shutting down; retry on another replica", headers={"Retry-After": "1"}
            )
            for message in error.asgi_messages():
                await send_with_id(message)
            self._record(scope, state, 503, started, refused=True)
            return
        self.lifecycle.in_flight += 1
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as error:  # every 5xx carries its request id, in the answer and in the log line
            log.error(
                f"unhandled error in request {request_id}: {type(error).__name__}: {error}",
                exc_info=error,
                extra={"request_id": request_id},
            )
            if status is None:
                failure = ApiError(
                    500, f"internal error; the request id is {request_id} (also in X-Request-ID)"
                )
                for message in failure.asgi_messages():
                    await send_with_id(message)
            status = status or 500
        finally:
            self.lifecycle.in_flight -= 1
            if status is None:  # no answer: the client left before it (the gate saw it go), or a bug
                status = CLIENT_GONE if state.get("client_gone") else 500
            self._record(scope, state, status, started)

    def _record(self, scope: dict, state: dict, status: int, started: float, refused: bool = False) -> None:
        latency = self.clock() - started
        route = getattr(scope.get("route"), "path", None)
        label = route or "unmatched"  # raw paths would make one time series per typo, and may hold PII
        self.metrics.requests.labels(label, str(status)).inc()
        if status >= 400 and not (refused or status == CLIENT_GONE or scope["path"] in PROBES):
            self.metrics.request_errors.labels(str(status)).inc()
        elif label.startswith("/v1/") and scope["method"] == "POST":
            self.metrics.e2e_request_latency.observe(latency)
        record = {
            "event": "request",
            "time": round(time.time(), 3),
            "request_id": state["request_id"],
            "method": scope["method"],
            "route": route or self.mask(scope["path"])[:200],
            "status": status,
            "latency_ms": round(latency * 1000, 2),
            "key": state.get("key_name"),
            "prompt_tokens": state.get("prompt_tokens"),
            "completion_tokens": state.get("completion_tokens"),
            "prompt_preview": state.get("prompt_preview"),  # masked by the route that set it
        }
        self.log.info(json.dumps({k: v for k, v in record.items() if v is not None}, ensure_ascii=False))
