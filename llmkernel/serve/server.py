"""`llmk serve`: run the app under uvicorn on 127.0.0.1 (by default) and drain on SIGTERM.

On SIGTERM (or the first Ctrl-C) the server drains: new requests get 503, /ready turns 503 so a load
balancer stops sending traffic, requests in flight (streams included) finish, for at most
`--drain_timeout_s` seconds; then uvicorn shuts down, the engine stops and `llmk serve` exits 0.
A second Ctrl-C exits at once.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import time
from types import FrameType

import uvicorn
import uvicorn.config
from uvicorn.importer import import_from_string

from llmkernel.errors import InputError
from llmkernel.serve.app import create_app
from llmkernel.serve.config import ServeConfig
from llmkernel.serve.gate import connection_protocol
from llmkernel.serve.logs import setup_logging
from llmkernel.serve.metrics import Lifecycle, Metrics
from llmkernel.serve.state import Services


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); InputError naming the port when it is taken.

    Bound here, before the server says where it serves, so that the message is true and a port in use is
    one line (uvicorn would log its address, then a multi-line error, and exit 3)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise InputError(f"--host {host}: not an address of this machine ({error.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after a stop (TIME_WAIT)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise InputError(
                f"port {port} on {host} is in use by another program; choose another --port (0 picks a free one)"
            ) from None
        raise InputError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock.set_inheritable(True)
    return sock


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain phase before its own shutdown."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.drain_timeout_s = drain_timeout_s
        self.drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_started is None and sig in (signal.SIGTERM, signal.SIGINT):
            self.drain_started = time.monotonic()
            self.lifecycle.status = "draining"
            logging.getLogger("llmkernel.serve").info(
                f"draining: {self.lifecycle.in_flight} request(s) in flight, up to {self.drain_timeout_s:g} s"
            )
            return  # not recorded as a captured signal: uvicorn would re-raise it after a clean exit
        super().handle_exit(sig, frame)  # a second signal: leave now

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            waited = time.monotonic() - self.drain_started
            if self.lifecycle.in_flight == 0 or waited >= self.drain_timeout_s:
                self.should_exit = True
        return await super().on_tick(counter)


def http_protocol(config: ServeConfig, metrics: Metrics) -> type:
    """uvicorn's HTTP protocol with --limit_concurrency and --header_timeout_s (gate.py), refusals counted."""
    return connection_protocol(
        import_from_string(uvicorn.config.HTTP_PROTOCOLS["auto"]),
        limit_concurrency=config.limit_concurrency,
        header_timeout_s=config.header_timeout_s,
        on_refused=lambda code: metrics.connections_refused.labels(str(code)).inc(),
    )


def serve(config: ServeConfig) -> None:
    """Serve `config.model` until SIGTERM; raises a UserError (exit code 2) if the model cannot load."""
    if config.backend == "ray":
        from llmkernel.serve.ray_backend import serve_on_ray

        setup_logging(config.pii_types)
        return serve_on_ray(config)
    server, sock, services = prepare_server(config)
    server.run(sockets=[sock])
    if services.lifecycle.status == "failed":
        raise InputError(services.load_error or "the model failed to load")


def prepare_server(config: ServeConfig) -> tuple[DrainingServer, socket.socket, Services]:
    """The app, its uvicorn server and its bound socket (the log line says where), not yet running."""
    setup_logging(config.pii_types)
    log = logging.getLogger("llmkernel.serve")
    app = create_app(config)
    services: Services = app.state.services
    sock = bind(config.host, config.port)
    port = sock.getsockname()[1]
    uvicorn_config = uvicorn.Config(
        app,
        http=http_protocol(config, services.metrics),
        access_log=False,  # the app writes its own access log, with PII masked
        log_config=None,  # uvicorn's loggers go to our JSON handler (setup_logging)
        timeout_graceful_shutdown=2,  # the drain above has waited already
        lifespan="on",
    )
    server = DrainingServer(uvicorn_config, services.lifecycle, config.drain_timeout_s)
    services.on_fatal = lambda: setattr(server, "should_exit", True)
    if config.api_keys:
        auth = f"API keys from {config.api_keys}"
    else:
        auth = "no API keys (open to anyone who can connect)"
        if not config.loopback:
            log.warning(
                f"serving WITHOUT API keys on {config.host}, an address other machines can reach: anyone "
                "on the network can use this model; create keys with `llmk keys create --keys-file "
                "keys.json` and pass --api_keys keys.json",
                extra={"own": True},
            )
    shown = f"[{config.host}]" if ":" in config.host else config.host
    log.info(
        f"serving {services.model_dir} as '{services.model_name}' ({services.task}) on "
        f"http://{shown}:{port} with {auth}"
    )
    return server, sock, services
