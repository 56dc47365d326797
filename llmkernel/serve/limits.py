"""Rate limits shared by every replica: `--rate_limit_backend redis://HOST:PORT` keeps the token buckets of
security.py's `RateLimiter` in Redis, so N servers behind one load balancer refuse what one server would
(issue 15).

* **One atomic script per check.** Each bucket, per (key name, kind), is a Redis hash {tokens, updated}
  under `PREFIX:NAME:KIND` (default prefix `llmk:ratelimit`). `BUCKET_SCRIPT` refills it, then takes,
  gives back or charges, in one Lua script: Redis runs a script alone, so two replicas checking the same
  key at once cannot both spend its last token. The clock is Redis `TIME`, one clock for every replica,
  whatever their own clocks say. A bucket's key expires when it would be full again, so idle keys leave
  no trace and expiry never changes an answer. One round trip per check (EVALSHA; redis-py loads the
  script and retries once on NOSCRIPT, e.g. after a Redis restart).
* **Serving never depends on Redis.** Sockets time out after 0.2 s, without retries. A failed call (or
  an unreachable Redis at start) switches this process to its own in-process limiter with the same
  limits, logs one warning, sets `llmk:rate_limit_backend_up` to 0, and starts a thread that PINGs Redis
  every `retry_interval_s`; when it answers, the buckets are shared again (one log line, gauge 1). While
  Redis is away each replica enforces the limits alone, so N replicas allow up to N times the budget.
* **Synchronous, on the event loop.** The limiter's interface is RateLimiter's (gate.py and routes.py call
  it without `await`), so a check blocks the loop for one round trip: ~0.1 ms on loopback, and at most
  the 0.2 s timeout once per outage; reconnecting happens on the prober thread, never on a request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from llmkernel.errors import first_line, optional_import
from llmkernel.serve.config import ServeConfig
from llmkernel.serve.metrics import Metrics
from llmkernel.serve.security import KeyStore, RateLimiter

log = logging.getLogger("llmkernel.serve")

SOCKET_TIMEOUT_S = 0.2  # a dead or blackholed Redis costs a request at most this, once per outage
RETRY_INTERVAL_S = 2.0  # how often the prober PINGs a Redis that went away

# KEYS[1]: the bucket's hash. ARGV: capacity (units per minute), amount, operation:
#   take   -> take `amount` and answer 0, or take nothing and answer the seconds until `amount` fits
#   give   -> give back `amount` (unused reserved tokens), never above capacity; answers 0
#   charge -> take `amount` even into debt (usage known only after the work); answers 0
# TokenBucket's arithmetic (security.py) step for step: refill at capacity/60 per second, capped at capacity.
BUCKET_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end -- Redis < 5: TIME before writes
local capacity = tonumber(ARGV[1])
local amount = tonumber(ARGV[2])
local operation = ARGV[3]
local per_second = capacity / 60
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local level, updated = tonumber(state[1]), tonumber(state[2])
if level == nil or updated == nil then
  level, updated = capacity, now
end
-- a clock that steps back (a failover to another host) refills nothing now, rather than twice later
level = math.min(capacity, level + math.max(0, now - updated) * per_second)
updated = math.max(updated, now)
local wait = 0
if operation == 'take' then
  if level >= amount then level = level - amount else wait = (amount - level) / per_second end
elseif operation == 'give' then
  level = math.min(capacity, level + amount)
else
  level = level - amount
end
redis.call('HSET', KEYS[1], 'tokens', level, 'updated', updated)
-- gone once it would be full again: a missing key reads as a full bucket, so expiry changes no answer
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - level) / per_second * 1000) + 1000)
return tostring(wait)
"""


def describe_url(url: str) -> str:
    """The backend for log lines: scheme, host, port and database, never a password in the URL."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{parts.port or 6379}{parts.path or ''}"


class SharedRateLimiter:
    """RateLimiter's interface with its buckets in Redis, and an in-process RateLimiter (same limits) to
    fall back on while Redis does not answer (see the module docstring)."""

    def __init__(
        self,
        url: str,
        requests_per_minute: int,
        tokens_per_minute: int,
        keys: KeyStore | None = None,
        *,
        prefix: str = "llmk:ratelimit",
        on_backend_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = SOCKET_TIMEOUT_S,
        retry_interval_s: float = RETRY_INTERVAL_S,
    ) -> None:
        redis = optional_import("redis", "redis")
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.local = RateLimiter(requests_per_minute, tokens_per_minute, keys, clock)
        self.where = describe_url(url)
        self.prefix = prefix
        self.retry_interval_s = retry_interval_s
        self.on_backend_change = on_backend_change or (lambda up: None)
        # No retries: a failed call falls back to the local limiter at once instead of stalling the request.
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )
        self.script = self.client.register_script(BUCKET_SCRIPT)
        self.backend_errors: tuple[type[Exception], ...] = (redis.exceptions.RedisError, OSError)
        self.up = False
        self._lock = threading.Lock()  # the event loop and the prober thread both switch `up`
        self._prober: threading.Thread | None = None
        self._closed = threading.Event()
        error = self._ping()
        if error is None:
            self._set_up(True)
            log.info(f"rate limits shared in Redis at {self.where} (keys {prefix}:NAME:KIND)")
        else:
            self._went_away(error)

    # ------------------------------------------------------------------------- RateLimiter's interface

    def take_request(self, key_name: str) -> float:
        wait = self._shared(key_name, "requests", "take", 1)
        return self.local.take_request(key_name) if wait is None else wait

    def token_limit(self, key_name: str) -> int:
        return self.local.token_limit(key_name)

    def reserve_tokens(self, key_name: str, amount: int) -> float:
        """Reserve the most tokens a request can use (prompt + max_tokens): 0, or the seconds to wait."""
        wait = self._shared(key_name, "tokens", "take", amount)
        return self.local.reserve_tokens(key_name, amount) if wait is None else wait

    def refund_tokens(self, key_name: str, amount: int) -> None:
        if amount > 0 and self._shared(key_name, "tokens", "give", amount) is None:
            self.local.refund_tokens(key_name, amount)

    def charge_tokens(self, key_name: str, amount: int) -> None:
        if self._shared(key_name, "tokens", "charge", amount) is None:
            self.local.charge_tokens(key_name, amount)

    def update_keys(self, keys: KeyStore) -> None:
        """Follow a reload of the keys file. The shared buckets need nothing: each call passes the key's
        current limit, and the script caps the level at it (a lowered limit hands out no fresh minute)."""
        self.local.update_keys(keys)

    def close(self) -> None:
        """Stop the prober and close the connections (the app's shutdown); a late call reconnects."""
        self._closed.set()
        self.client.close()

    # ---------------------------------------------------------------------------------------- Redis

    def bucket_key(self, key_name: str, kind: str) -> str:
        return f"{self.prefix}:{key_name}:{kind}"

    def _shared(self, key_name: str, kind: str, operation: str, amount: int) -> float | None:
        """The script's answer; 0 for an unlimited key (no round trip); None when Redis is away."""
        limit = self.local.limit(key_name, kind)
        if limit <= 0:
            return 0.0
        if not self.up:
            return None
        try:
            answer = self.script(keys=[self.bucket_key(key_name, kind)], args=[limit, amount, operation])
        except self.backend_errors as error:
            self._went_away(error)
            return None
        return float(answer)

    def _ping(self) -> Exception | None:
        try:
            self.client.ping()
        except self.backend_errors as error:
            return error
        return None

    def _set_up(self, up: bool) -> None:
        self.up = up
        self.on_backend_change(up)

    def _went_away(self, error: Exception) -> None:
        """Fall back to the local limiter: one warning per outage, and a prober to notice the return."""
        with self._lock:
            if self._prober is not None:
                return  # already falling back
            self._set_up(False)
            if self._closed.is_set():
                return  # shutting down: no prober, no warning
            self._prober = threading.Thread(target=self._probe, name="llmk-rate-limit-prober", daemon=True)
            self._prober.start()
        log.warning(
            f"rate limit backend {self.where} does not answer ({type(error).__name__}: {first_line(error)}); "
            f"each server enforces the limits on its own until it does (retrying every "
            f"{self.retry_interval_s:g} s)",
            extra={"own": True},  # the server's own words: its PII mask would hide the address
        )

    def _probe(self) -> None:
        while not self._closed.wait(self.retry_interval_s):
            if self._ping() is None:
                with self._lock:
                    self._prober = None
                    self._set_up(True)
                log.info(f"rate limit backend {self.where} answers again: limits are shared again")
                return


def make_limiter(
    config: ServeConfig, keys: KeyStore | None, metrics: Metrics, clock: Callable[[], float]
) -> RateLimiter | SharedRateLimiter:
    """The limiter `create_app` gives the routes: shared in Redis with --rate_limit_backend, else local."""
    if not config.rate_limit_backend:
        return RateLimiter(config.requests_per_minute, config.tokens_per_minute, keys, clock)
    gauge = metrics.track_rate_limit_backend()
    return SharedRateLimiter(
        config.rate_limit_backend,
        config.requests_per_minute,
        config.tokens_per_minute,
        keys,
        prefix=config.rate_limit_prefix,
        on_backend_change=lambda up: gauge.set(1 if up else 0),
        clock=clock,
    )
