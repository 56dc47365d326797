"""API keys, per-key rate limits, the request body size limit and PII masking for the server.

* Keys: `llmk keys create` prints a random key once and stores only its SHA-256 in a JSON keys file. A key
  is 256 random bits, so a plain SHA-256 cannot be brute-forced and is cheap enough to check on every
  request (a password hash such as scrypt protects low-entropy secrets and would cost ~50 ms a request).
  Presented keys are hashed and compared with `hmac.compare_digest` against every stored hash, so neither
  the comparison nor the loop ends early on a partial or first match.
* Nothing here is a module global: the app gets its `KeyStore`, `RateLimiter` and `PiiMasker` when it is
  built (`create_app`), and the auth dependency reads them from `request.app.state.services`.
* Rate limits are token buckets (requests per minute and tokens per minute) per key name, refilled
  continuously; an empty bucket answers 429 with `Retry-After`, the seconds until the request would fit.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from llmkernel.errors import InputError, UserError
from llmkernel.pii import PLACEHOLDERS, PiiDetector
from llmkernel.runs import atomic_write_json
from llmkernel.serve.schemas import ApiError

KEY_PREFIX = "llmk-"
ANONYMOUS = "anonymous"  # the caller's name when the server runs without --api_keys

# ------------------------------------------------------------------------------------------- API keys


@dataclass(frozen=True)
class ApiKey:
    """One entry of the keys file; `hash` is "sha256:<hex>" of the key, the key itself is never stored."""

    name: str
    hash: str
    created: str
    requests_per_minute: int | None = None  # per-key overrides of --requests_per_minute
    tokens_per_minute: int | None = None


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore:
    """The API keys a server accepts, checked in constant time."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = list(keys)

    @classmethod
    def load(cls, path: str | Path) -> KeyStore:
        """Read a keys file written by `llmk keys create`; InputError if it is missing, malformed or empty."""
        keys = _read_keys_file(Path(path))
        if not keys:
            raise InputError(f"{path}: holds no keys; add one with: llmk keys create --keys-file {path}")
        return cls(keys)

    def verify(self, presented: str) -> ApiKey | None:
        """The key whose hash matches `presented`, or None; compares against every key, no early exit."""
        digest = hash_key(presented).encode()
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.hash.encode()):
                found = key
        return found


def _read_keys_file(path: Path) -> list[ApiKey]:
    if not path.is_file():
        raise InputError(f"keys file not found: {path}; create one with: llmk keys create --keys-file {path}")
    try:
        entries = json.loads(path.read_text(encoding="utf-8")).get("keys", [])
        keys = [ApiKey(**entry) for entry in entries]
    except (json.JSONDecodeError, AttributeError, TypeError) as error:
        raise InputError(f"{path}: not a keys file written by `llmk keys create` ({error})") from None
    for key in keys:
        if not key.hash.startswith("sha256:") or len(key.hash) != 71:
            raise InputError(f"{path}: key '{key.name}' has no valid 'sha256:<hex>' hash")
    return keys


def create_key(path: str | Path, name: str | None = None) -> tuple[str, ApiKey]:
    """Add a new random key to the keys file at `path` (created if missing, mode 0600).

    Returns the key, which the caller shows once: only its hash is written.
    Raises UserError when `name` is already taken.
    """
    path = Path(path)
    keys = _read_keys_file(path) if path.exists() else []
    name = name or f"key-{len(keys) + 1}"
    if any(key.name == name for key in keys):
        raise UserError(f"{path}: a key named '{name}' exists already; choose another --name")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    entry = ApiKey(name=name, hash=hash_key(secret), created=datetime.now(UTC).isoformat(timespec="seconds"))
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{k: v for k, v in vars(key).items() if v is not None} for key in [*keys, entry]]
    atomic_write_json(path, {"keys": records})
    os.chmod(path, 0o600)
    return secret, entry


# The scheme declared in the OpenAPI spec; auto_error=False so a missing key becomes our own 401 body.
bearer_scheme = HTTPBearer(auto_error=False, description="an API key made with `llmk keys create`")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


async def require_api_key(request: Request, credentials: Credentials) -> str:
    """FastAPI dependency: the caller's key name; 401 when the server has keys and none of them matches."""
    keys: KeyStore | None = request.app.state.services.keys
    if keys is None:
        name = ANONYMOUS
    else:
        key = keys.verify(credentials.credentials) if credentials is not None else None
        if key is None:
            raise ApiError(
                401,
                "missing or invalid API key; send the header 'Authorization: Bearer KEY'",
                type="authentication_error",
                headers={"WWW-Authenticate": "Bearer"},
            )
        name = key.name
    request.state.key_name = name
    return name


async def require_metrics_access(request: Request, credentials: Credentials) -> None:
    """/metrics needs a key too, unless the server runs with --public_metrics."""
    if not request.app.state.services.config.public_metrics:
        await require_api_key(request, credentials)


async def limit_request_rate(request: Request, key_name: Annotated[str, Depends(require_api_key)]) -> str:
    """FastAPI dependency for the /v1 routes: the key name after taking one request from its bucket."""
    services = request.app.state.services
    wait = services.limiter.take_request(key_name)
    if wait > 0:
        services.metrics.rate_limited.inc()
        raise rate_limited(wait, "requests per minute")
    return key_name


def rate_limited(wait_s: float, what: str) -> ApiError:
    return ApiError(
        429,
        f"rate limit exceeded ({what}); retry in {math.ceil(wait_s)} s",
        type="rate_limit_error",
        headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
    )


# ---------------------------------------------------------------------------------------- rate limits


class TokenBucket:
    """Holds up to `capacity` units and refills at `capacity` per minute."""

    def __init__(self, capacity: float, clock: Callable[[], float]) -> None:
        self.capacity = capacity
        self.per_second = capacity / 60.0
        self.clock = clock
        self.level = capacity
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.per_second)
        self.updated = now

    def take(self, amount: float) -> float:
        """Take `amount` and return 0, or take nothing and return the seconds until `amount` fits."""
        self._refill()
        if self.level >= amount:
            self.level -= amount
            return 0.0
        return (amount - self.level) / self.per_second

    def give_back(self, amount: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + amount)

    def charge(self, amount: float) -> None:
        """Take `amount` even if that leaves a debt (for usage only known after the work is done)."""
        self._refill()
        self.level -= amount


class RateLimiter:
    """Per-key request and token buckets; a limit of 0 means unlimited."""

    def __init__(
        self,
        requests_per_minute: int,
        tokens_per_minute: int,
        keys: KeyStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.defaults = (requests_per_minute, tokens_per_minute)
        self.overrides = {key.name: key for key in keys.keys} if keys else {}
        self.clock = clock
        self.buckets: dict[tuple[str, str], TokenBucket | None] = {}

    def _bucket(self, key_name: str, kind: str) -> TokenBucket | None:
        if (key_name, kind) not in self.buckets:
            key = self.overrides.get(key_name)
            override = getattr(key, f"{kind}_per_minute", None) if key else None
            limit = override if override is not None else self.defaults[kind == "tokens"]
            self.buckets[key_name, kind] = TokenBucket(limit, self.clock) if limit > 0 else None
        return self.buckets[key_name, kind]

    def take_request(self, key_name: str) -> float:
        bucket = self._bucket(key_name, "requests")
        return bucket.take(1) if bucket else 0.0

    def token_limit(self, key_name: str) -> int:
        bucket = self._bucket(key_name, "tokens")
        return int(bucket.capacity) if bucket else 0

    def reserve_tokens(self, key_name: str, amount: int) -> float:
        """Reserve the most tokens a request can use (prompt + max_tokens); see `take`."""
        bucket = self._bucket(key_name, "tokens")
        return bucket.take(amount) if bucket else 0.0

    def refund_tokens(self, key_name: str, amount: int) -> None:
        if (bucket := self._bucket(key_name, "tokens")) is not None and amount > 0:
            bucket.give_back(amount)

    def charge_tokens(self, key_name: str, amount: int) -> None:
        if (bucket := self._bucket(key_name, "tokens")) is not None:
            bucket.charge(amount)


# ----------------------------------------------------------------------------------- body size limit


class BodySizeLimitMiddleware:
    """Answers 413 to bodies over `max_body_bytes`, declared (Content-Length) or streamed (chunked).

    The body is read here, up to the limit, and replayed to the app: a limit hit while FastAPI reads the
    body would otherwise surface as its generic 400 "error parsing the body".
    """

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await self._too_large(send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending the whole body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await self._too_large(send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for http.disconnect, as streaming responses do

        await self.app(scope, replay, send)

    async def _too_large(self, send: Callable) -> None:
        error = ApiError(413, f"request body is larger than the limit of {self.max_body_bytes} bytes")
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------------------- PII masking


class PiiMasker:
    """The PII detector of `llmk prepare`, applied to logs (always) and to model inputs/outputs (opt-in)."""

    # More than the longest match the detector finds except unusual e-mail addresses (IPv6: 45 chars).
    STREAM_HOLD_CHARS = 64

    def __init__(self, types: list[str]) -> None:
        self.detector = PiiDetector(types)

    def mask(self, text: str) -> str:
        return self.detector.mask(text)[0]

    def preview(self, text: str, chars: int) -> str:
        """The first `chars` characters of `text` with PII masked (masked first, then cut)."""
        if chars <= 0:
            return ""
        masked = self.mask(text[: chars + 4 * self.STREAM_HOLD_CHARS])
        return masked[:chars] + ("..." if len(masked) > chars else "")

    def stream(self) -> StreamMasker:
        return StreamMasker(self.detector, self.STREAM_HOLD_CHARS)


class StreamMasker:
    """Masks text that arrives in pieces: holds back the last `hold` characters, which may be the start of
    a phone number or an address still being generated, and releases text up to a safe cut."""

    def __init__(self, detector: PiiDetector, hold: int) -> None:
        self.detector = detector
        self.hold = hold
        self.pending = ""

    def feed(self, text: str) -> str:
        """Masked text that can be sent now ("" while everything is held back)."""
        self.pending += text
        if len(self.pending) <= self.hold:
            return ""
        cut = len(self.pending) - self.hold
        space = self.pending.rfind(" ", 0, cut)  # prefer a word boundary, as most PII has no spaces
        cut = space + 1 if space > 0 else cut
        spans = self.detector.find(self.pending)
        for span in spans:
            if span.start < cut < span.end:
                cut = span.start
        return self._release(cut, spans)

    def flush(self) -> str:
        """Everything still held back, masked (call once at the end of the stream)."""
        return self._release(len(self.pending), self.detector.find(self.pending))

    def _release(self, cut: int, spans: list) -> str:
        parts, pos = [], 0
        for span in spans:
            if span.end <= cut:
                parts += (self.pending[pos : span.start], PLACEHOLDERS[span.type])
                pos = span.end
        parts.append(self.pending[pos:cut])
        self.pending = self.pending[cut:]
        return "".join(parts)
