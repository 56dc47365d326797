"""`llmk serve MODEL --backend ray`: the same FastAPI app as a Ray Serve deployment whose replicas follow the
traffic.

Each replica builds the app with `create_app` (routes, keys, limits, PII masking, metrics: nothing is a
second app) through Ray Serve's ingress, at replica start (`__serve_build_asgi_app__`), so the model is
loaded in the replica and never pickled. Ray's autoscaler adds a replica when the requests in flight per
replica, averaged over `--look_back_period_s`, stay above `--target_ongoing_requests` for
`--upscale_delay_s`, and removes one after `--downscale_delay_s` below it, between `--min_replicas` and
`--max_replicas`. Each replica reserves `--replica_cpus` (fractions allowed, so several fit on 2 cores)
and runs one torch thread: replicas, not threads, share the cores.

What differs from the uvicorn backend: Ray's proxy owns the connections, so `--limit_concurrency` and
`--header_timeout_s` (uvicorn-level) do not apply (Ray queues what exceeds each replica's
`max_ongoing_requests`); each replica's `/metrics` is its own (scrape Ray's metrics port for the whole
deployment, or each replica); rate limits are per replica unless `--rate_limit_backend` shares them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import threading
from collections.abc import AsyncIterator
from typing import Any

from llmkernel.config import build, to_dict
from llmkernel.errors import InputError, optional_import
from llmkernel.serve.config import ServeConfig

APP_NAME = "llmk"
DEPLOYMENT_NAME = "LlmkReplica"
REPLICA_THREADS = 1  # torch threads per replica: the replicas share the cores


def replica_cpus(config: ServeConfig) -> float:
    """CPUs reserved per replica: `--replica_cpus`, or the machine's cores split over `--max_replicas`."""
    if config.replica_cpus:
        return config.replica_cpus
    return round(max(0.1, (os.cpu_count() or 1) / config.max_replicas), 2)


def autoscaling_config(config: ServeConfig) -> dict[str, Any]:
    """Ray Serve's autoscaling settings from the flags (metrics sampled twice per look-back window)."""
    return {
        "min_replicas": config.min_replicas,
        "max_replicas": config.max_replicas,
        "target_ongoing_requests": config.target_ongoing_requests,
        "upscale_delay_s": config.upscale_delay_s,
        "downscale_delay_s": config.downscale_delay_s,
        "look_back_period_s": config.look_back_period_s,
        "metrics_interval_s": min(10.0, config.look_back_period_s / 2),
    }


def ready_when_loaded(app: Any) -> Any:
    """`app` whose startup ends when the model is loaded (or fails with its load error).

    Under uvicorn the model loads in the background and /ready says when it is done; Ray Serve instead
    routes to a replica as soon as its startup ends, so the startup waits for the model here and a replica
    gets traffic only once it can answer.
    """
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def until_loaded(running: Any) -> AsyncIterator[None]:
        async with inner(running):
            services = running.state.services
            while services.lifecycle.status == "loading":
                await asyncio.sleep(0.05)
            if services.lifecycle.status == "failed":
                raise RuntimeError(services.load_error)
            yield

    app.router.lifespan_context = until_loaded
    return app


def deployment(config: ServeConfig) -> Any:
    """The Ray Serve deployment (not yet bound) that serves `config` with `create_app` in every replica."""
    serve = optional_import("ray.serve", "ray")
    fields = to_dict(config)

    @serve.ingress()
    class LlmkReplica:
        """One replica: the config arrives as plain fields; the app is built when the replica starts."""

        def __init__(self, config_fields: dict[str, Any]) -> None:
            self.config = build(ServeConfig, config_fields)

        def __serve_build_asgi_app__(self) -> Any:
            import torch

            from llmkernel.serve.app import create_app
            from llmkernel.serve.logs import setup_logging

            torch.set_num_threads(REPLICA_THREADS)
            setup_logging(self.config.pii_types)
            return ready_when_loaded(create_app(self.config))

    max_ongoing = max(config.max_batch_size, math.ceil(2 * config.target_ongoing_requests))
    return serve.deployment(
        LlmkReplica,
        name=DEPLOYMENT_NAME,
        autoscaling_config=autoscaling_config(config),
        max_ongoing_requests=max_ongoing,
        ray_actor_options={
            "num_cpus": replica_cpus(config),
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(REPLICA_THREADS), "HF_HUB_OFFLINE": "1"}},
        },
        health_check_period_s=5,
    ).bind(fields)


def start(config: ServeConfig, on_signal: Any = None) -> str:
    """Start (or join) Ray, then Serve on `--host:--port` with the deployment; returns the URL.

    `on_signal` handles SIGTERM and SIGINT from the moment Ray has started (Ray's own handler, installed
    by `ray.init`, would end the process at once, mid-deployment).
    """
    ray = optional_import("ray", "ray")
    serve = optional_import("ray.serve", "ray")
    if not ray.is_initialized():
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if config.ray_address:
            options["address"] = config.ray_address
        ray.init(**options)
    if on_signal is not None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
    serve.start(http_options={"host": config.host, "port": config.port})
    try:
        serve.run(deployment(config), name=APP_NAME, route_prefix="/")
    except Exception as error:  # a replica that cannot load the model fails the deployment
        serve.shutdown()
        raise InputError(f"the Ray Serve deployment failed: {str(error).strip().splitlines()[-1]}") from None
    shown = f"[{config.host}]" if ":" in config.host else config.host
    return f"http://{shown}:{config.port}"


def replica_counts() -> dict[str, int]:
    """Replicas of the deployment by state (RUNNING, STARTING, STOPPING, ...), from Ray Serve's status."""
    serve = optional_import("ray.serve", "ray")
    application = serve.status().applications.get(APP_NAME)
    if application is None or DEPLOYMENT_NAME not in application.deployments:
        return {}
    return {
        str(state): count for state, count in application.deployments[DEPLOYMENT_NAME].replica_states.items()
    }


def serve_on_ray(config: ServeConfig) -> None:
    """`llmk serve --backend ray`: serve until SIGTERM or Ctrl-C, then shut Serve (and a Ray it started) down."""
    ray = optional_import("ray", "ray")
    serve = optional_import("ray.serve", "ray")
    log = logging.getLogger("llmkernel.serve")
    stop = threading.Event()

    def on_signal(*_: Any) -> None:
        stop.set()

    url = start(config, on_signal)
    log.info(
        f"serving {config.model} on Ray Serve at {url}: {config.min_replicas}-{config.max_replicas} replicas of "
        f"{replica_cpus(config)} CPU, scaling at {config.target_ongoing_requests:g} requests in flight each"
    )
    last: dict[str, int] = {}
    while not stop.wait(5.0):
        counts = replica_counts()
        if counts != last:
            log.info(f"replicas: {counts}")
            last = counts
    log.info("shutting down Ray Serve")
    serve.shutdown()
    if not config.ray_address:
        ray.shutdown()
