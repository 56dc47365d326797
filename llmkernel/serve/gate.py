"""What a request passes before a route runs, cheapest check first, so that a client who may not use the
server costs it as little as possible (serve/security.py keeps the keys file, rate limits and PII masking).

`Gate`, an ASGI middleware inside RequestObserver (metrics.py), in this order:

1. **Host** (a DNS-rebinding guard, the bug class of Ollama's CVE-2024-28224): bound to a loopback address,
   the server answers only Host names of this machine (localhost, 127.0.0.1, ::1), so a web page the
   operator opens cannot reach it under a name of its own; 403 otherwise. `--allowed_hosts` widens it.
2. **API key**, from the headers alone, before a byte of the body is read: 401 (every route but /health,
   the page at / with its two files, and /metrics with --public_metrics). The routes' dependency
   `require_api_key` reads the name found here.
3. **Per-key concurrency**: a key with `--max_concurrent_per_key` /v1 requests in flight gets 429.
4. **The body**, read here up to `--max_body_bytes` (413) within `--body_timeout_s` (408), then replayed to
   the app. A client that leaves while sending it gets no answer (logged as 499, not as a server error).

`connection_protocol` limits what happens before the first ASGI call, at the connection: at most
`--limit_concurrency` open connections (one more is answered 429 and closed) and `--header_timeout_s` to
send a request's headers (408 and closed), also for a keep-alive connection's next request. uvicorn keeps
an idle new connection, or one sending its headers a byte a minute, open for ever.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from llmkernel.serve.chat.page import PAGE_PATHS
from llmkernel.serve.schemas import ApiError
from llmkernel.serve.security import ANONYMOUS

# The scheme declared in the OpenAPI spec; auto_error=False so a missing key becomes our own 401 body.
bearer_scheme = HTTPBearer(auto_error=False, description="an API key made with `llmk keys create`")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
# Answered without a key (and /metrics with --public_metrics): liveness, and the page at / with its script
# and style (chat/page.py), which hold no data; the calls the page makes send the key.
OPEN_ROUTES = ("/health", *PAGE_PATHS)


# ------------------------------------------------------------------------------- route dependencies


async def require_api_key(request: Request, credentials: Credentials) -> str:
    """FastAPI dependency: the caller's key name, as the Gate checked it (the parameter declares the
    bearer scheme in the OpenAPI spec)."""
    name = getattr(request.state, "key_name", None)
    if name is None:  # not reachable through the Gate; kept so that a route never runs unchecked
        raise _unauthorized()
    return name


async def require_metrics_access(request: Request, credentials: Credentials) -> None:
    """/metrics needs a key too, unless the server runs with --public_metrics (the Gate checks both)."""


async def limit_request_rate(request: Request, key_name: Annotated[str, Depends(require_api_key)]) -> str:
    """FastAPI dependency for the /v1 routes: the key name after taking one request from its bucket."""
    services = request.app.state.services
    wait = services.limiter.take_request(key_name)
    if wait > 0:
        services.metrics.rate_limited.inc()
        raise rate_limited(wait, "requests per minute")
    return key_name


def rate_limited(wait_s: float, what: str) -> ApiError:
    return too_many(f"rate limit exceeded ({what}); retry in {math.ceil(wait_s)} s", wait_s)


def too_many(message: str, wait_s: float = 1.0) -> ApiError:
    """A 429 with Retry-After (whole seconds, at least 1): a rate limit, or a limit on what is in flight."""
    return ApiError(
        429, message, type="rate_limit_error", headers={"Retry-After": str(max(1, math.ceil(wait_s)))}
    )


def _unauthorized() -> ApiError:
    return ApiError(
        401,
        "missing or invalid API key; send the header 'Authorization: Bearer KEY'",
        type="authentication_error",
        headers={"WWW-Authenticate": "Bearer"},
    )


# ---------------------------------------------------------------------------------------------- the gate


class Gate:
    """Host, key, per-key concurrency and body checks before the app (see the module docstring)."""

    def __init__(self, app: Any, services: Any) -> None:
        self.app = app
        self.services = services
        self.in_flight: dict[str, int] = {}  # key name -> /v1 requests being answered

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        config = self.services.config
        state = scope.setdefault("state", {})
        headers = dict(scope["headers"])
        try:
            _check_host(headers.get(b"host", b""), config.host_names)
            name = self._key_name(scope["path"], headers.get(b"authorization"))
            if name is not None:
                state["key_name"] = name
            limited = name is not None and scope["path"].startswith("/v1/") and config.max_concurrent_per_key
            if limited and self.in_flight.get(name, 0) >= config.max_concurrent_per_key:
                self.services.metrics.rate_limited.inc()
                raise too_many(
                    f"this key has {config.max_concurrent_per_key} requests in flight, the most one key may "
                    "have (--max_concurrent_per_key); retry when one has finished"
                )
            body = await self._read_body(headers, receive)
        except ApiError as error:
            for message in error.asgi_messages():
                await send(message)
            return
        if body is None:  # the client left while sending the body: nobody to answer
            state["client_gone"] = True
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for http.disconnect (routes watch for it)

        if limited:
            self.in_flight[name] = self.in_flight.get(name, 0) + 1
        try:
            await self.app(scope, replay, send)
        finally:
            if limited:
                self.in_flight[name] -= 1
                if not self.in_flight[name]:
                    del self.in_flight[name]

    def _key_name(self, path: str, authorization: bytes | None) -> str | None:
        """The caller's key name; None on routes open to anyone; ApiError(401) for a missing or wrong key."""
        keys = self.services.keys
        if path in OPEN_ROUTES or (path == "/metrics" and self.services.config.public_metrics):
            return None
        if keys is None:
            return ANONYMOUS
        scheme, _, presented = (authorization or b"").decode("latin-1").partition(" ")
        key = keys.verify(presented.strip()) if scheme.lower() == "bearer" and presented.strip() else None
        if key is None:
            raise _unauthorized()
        return key.name

    async def _read_body(self, headers: dict[bytes, bytes], receive: Callable) -> bytes | None:
        """The whole body (b"" for none) within the size limit and the deadline; None if the client left."""
        config = self.services.config
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > config.max_body_bytes):
            raise _too_large(config.max_body_bytes)
        if declared in (None, b"0") and b"transfer-encoding" not in headers:
            return b""  # no body: do not wait for one
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.body_timeout_s
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise ApiError(
                    408,
                    f"the request body did not arrive within {config.body_timeout_s:g} s "
                    "(--body_timeout_s); send it at once",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > config.max_body_bytes:
                raise _too_large(config.max_body_bytes)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"request body is larger than the limit of {limit} bytes (--max_body_bytes)",
        headers={"Connection": "close"},
    )


def _check_host(host: bytes, allowed: list[str] | None) -> None:
    """ApiError(403) unless the Host header names an allowed host (any port)."""
    if allowed is None:
        return
    text = host.decode("latin-1").strip().lower()
    if text.startswith("[") and "]" in text:  # [::1]:8000
        name = text[1 : text.index("]")]
    elif text.count(":") == 1:  # localhost:8000
        name = text.partition(":")[0]
    else:  # a name without a port, or a bare IPv6 address
        name = text
    if name not in allowed:
        shown = text[:100] or "(none)"
        raise ApiError(
            403,
            f"Host {shown!r} is not allowed: this server answers {', '.join(allowed)} only "
            "(a guard against DNS rebinding; widen it with --allowed_hosts)",
            type="permission_error",
        )


# ------------------------------------------------------------------------------------- connections


def connection_protocol(
    base: type, *, limit_concurrency: int, header_timeout_s: float, on_refused: Callable[[int], None]
) -> type:
    """A subclass of uvicorn's HTTP protocol class `base` (h11 or httptools) with the connection limit and
    the header deadline of the module docstring; `on_refused(status)` counts each refusal."""

    def raw_error(error: ApiError) -> bytes:
        """The answer as bytes on the wire: there is no HTTP state machine yet to send it through."""
        start, body = error.asgi_messages()
        lines = [f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}".encode()]
        lines += [name + b": " + value for name, value in [*start["headers"], (b"connection", b"close")]]
        return b"\r\n".join(lines) + b"\r\n\r\n" + body["body"]

    class LimitedProtocol(base):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._header_timer = None
            if limit_concurrency and len(self.connections) > limit_concurrency:
                on_refused(429)
                transport.write(
                    raw_error(
                        too_many(
                            f"this server has {limit_concurrency} connections open, its limit "
                            "(--limit_concurrency); retry shortly"
                        )
                    )
                )
                transport.close()
                return
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late, self.cycle)

        def _headers_late(self, cycle_when_armed: Any) -> None:
            if self.cycle is not cycle_when_armed or self.transport.is_closing():
                return  # a request's headers arrived in time
            on_refused(408)
            message = f"the request headers did not arrive within {header_timeout_s:g} s (--header_timeout_s)"
            self.transport.write(raw_error(ApiError(408, message)))
            self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()  # the next request on this connection gets the same deadline

        def connection_lost(self, exc: Exception | None) -> None:
            if getattr(self, "_header_timer", None) is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    LimitedProtocol.__name__ = f"Limited{base.__name__}"
    return LimitedProtocol
