"""The `llmk serve` config: the schema of `llmk serve --help`, YAML recipes and the saved run.json."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from llmkernel.config import check, option
from llmkernel.pii import PII_TYPES

PII_MASK_MODES = ("none", "inputs", "outputs", "both")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def redis_url_problem(url: str) -> str | None:
    """What is wrong with a --rate_limit_backend URL (None: nothing), checked at start rather than at the
    first request, where it would only show as the fallback warning. A password in it is not repeated."""
    shown = re.sub(r"//[^@/]*@", "//***@", url)
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError for a port that is not a number in 0-65535
    except ValueError as error:
        return f"{shown!r} is not a URL ({error})"
    if parts.scheme not in ("redis", "rediss", "unix"):
        return f"{shown!r} is not a Redis URL (redis://, rediss:// or unix://)"
    if parts.scheme == "unix":
        return None if parts.path else f"{shown!r} names no socket file (unix:///path/to/redis.sock)"
    if not parts.hostname:
        return f"{shown!r} names no host"
    if port == 0:
        return f"{shown!r}: port 0 is not a port Redis listens on"
    if parts.path.strip("/") and not parts.path.strip("/").isdigit():
        return f"{shown!r}: the path must be a database number (/0), got {parts.path!r}"
    return None


@dataclass
class ServeConfig:
    """`llmk serve MODEL`: OpenAI-compatible routes, API keys, rate limits, PII masking and metrics."""

    model: str = option(
        "",
        "model folder, .gguf file or offline model name (smollm2-135m-instruct, all-minilm-l6-v2)",
        positional=True,
    )
    host: str = option("127.0.0.1", "address to bind; 0.0.0.0 exposes the server to the network")
    port: int = option(8000, "TCP port (0: any free port)")
    served_model_name: str | None = option(None, "model id in /v1/models and responses; default: folder name")
    device: str = option("cpu", "torch device for the model: cpu, cuda, cuda:1, ...")
    quantize: str = option(
        "fp16",
        "weights of the decoder fast path: none (fp32), fp16, int8 or int4 (int8/int4: CPU only; see "
        "serve/quantize.py); a folder from `llmk quantize` runs as stored",
    )
    # security
    api_keys: str | None = option(
        None, "keys file from `llmk keys create`; turns on Bearer auth for every route but /health"
    )
    public_metrics: bool = option(False, "serve /metrics without a key even when --api_keys is set")
    requests_per_minute: int = option(0, "per-key request limit (token bucket; 0: unlimited)")
    tokens_per_minute: int = option(0, "per-key prompt+completion token limit (token bucket; 0: unlimited)")
    rate_limit_backend: str | None = option(
        None,
        "redis://HOST:PORT[/DB] (or rediss://, unix://PATH): rate limits shared by every server using it "
        "(needs the redis extra); default: each server limits on its own",
    )
    rate_limit_prefix: str = option("llmk:ratelimit", "prefix of the Redis keys of --rate_limit_backend")
    max_body_bytes: int = option(1_048_576, "largest request body accepted; larger ones get 413")
    max_prompt_tokens: int = option(0, "longest prompt in tokens (0: the model's context length)")
    max_tokens: int = option(512, "largest `max_tokens` a completion request may ask for")
    max_inputs: int = option(256, "most inputs in one embeddings/classify/ner request")
    allowed_hosts: list[str] | None = option(
        None,
        "Host header names accepted (a DNS-rebinding guard); default: localhost, 127.0.0.1 and ::1 when "
        "bound to a loopback address, any name otherwise; '*' accepts any",
    )
    # limits: what one client can hold (each answered 429 with Retry-After, or 408 for a slow client)
    limit_concurrency: int = option(
        128, "most open connections; one more is answered 429 and closed (0: no limit)"
    )
    max_waiting: int = option(
        64, "most requests queued for the model (not yet running); more are answered 429 (0: no limit)"
    )
    max_concurrent_per_key: int = option(
        8, "most requests one API key has in flight at once; more are answered 429 (0: no limit)"
    )
    header_timeout_s: float = option(
        10.0, "seconds a client has to send a request's headers; slower ones get 408 and are closed"
    )
    body_timeout_s: float = option(
        30.0, "seconds a client has to send a request's body once its headers are in; slower ones get 408"
    )
    pii_mask: str = option(
        "none",
        "mask personal data also in what the model sees (inputs), in what it sends back (outputs) or both; "
        "request logs are always masked",
    )
    pii_types: list[str] = option(
        help="PII types to mask: " + ", ".join(PII_TYPES), factory=lambda: list(PII_TYPES)
    )
    log_prompt_chars: int = option(80, "characters of the (masked) prompt kept in each request log line")
    # batching
    max_batch_size: int = option(16, "most sequences in one forward pass (generation and encoders)")
    batch_window_ms: float = option(5.0, "how long encoder requests wait to share a forward pass")
    max_num_batched_tokens: int = option(4096, "most tokens the generation engine schedules per step")
    max_model_len: int | None = option(None, "context length for generation; default: the model's")
    request_timeout_s: float = option(
        600.0, "generation requests running longer end with finish_reason timeout"
    )
    num_beams: int = option(4, "encoder-decoder (seq2seq) models: beam size of /v1/completions (1: greedy)")
    # retrieval (serve/search.py)
    index: str | None = option(
        None,
        "index folder from `llmk index`: adds /v1/search to an encoder server (the index's encoder), and "
        "grounds a decoder's chat answers in its passages (their ids in `sources`)",
    )
    rag_passages: int = option(3, "decoders with --index: passages retrieved into each chat prompt")
    # lifecycle and monitoring
    drain_timeout_s: float = option(30.0, "on SIGTERM, how long in-flight requests may take to finish")
    alerts: str | None = option(
        None, "YAML alert rules evaluated in the server (see the README, section `llmk serve`)"
    )
    alert_webhook: str | None = option(
        None, "URL that firing alerts are POSTed to (overrides the rules file)"
    )
    seed: int = option(0, "seed for sampling requests that do not give one")
    # Ray Serve (serve/ray_backend.py): the same app as a deployment whose replicas follow the traffic.
    backend: str = option("uvicorn", "uvicorn (one process) or ray (a Ray Serve deployment, autoscaled)")
    min_replicas: int = option(1, "ray: fewest replicas (each loads the model)")
    max_replicas: int = option(1, "ray: most replicas the autoscaler may start")
    target_ongoing_requests: float = option(
        2.0, "ray: requests in flight per replica the autoscaler aims at (more: it adds replicas)"
    )
    upscale_delay_s: float = option(30.0, "ray: how long the load must stay high before a replica is added")
    downscale_delay_s: float = option(600.0, "ray: how long it must stay low before a replica is removed")
    look_back_period_s: float = option(30.0, "ray: window over which requests in flight are averaged")
    replica_cpus: float = option(0.0, "ray: CPUs reserved per replica, fractions allowed (0: cores / max)")
    ray_address: str | None = option(None, "ray: address of a running Ray cluster (default: start one here)")

    def __post_init__(self) -> None:
        check(bool(self.model), "model", "a model folder, .gguf file or model name is required")
        check(0 <= self.port <= 65535, "port", "must be between 0 and 65535")
        check(self.requests_per_minute >= 0, "requests_per_minute", "must be >= 0 (0: unlimited)")
        check(self.tokens_per_minute >= 0, "tokens_per_minute", "must be >= 0 (0: unlimited)")
        if self.rate_limit_backend:
            problem = redis_url_problem(self.rate_limit_backend)
            check(problem is None, "rate_limit_backend", f"{problem}; give e.g. redis://127.0.0.1:6379")
        check(bool(self.rate_limit_prefix.strip()), "rate_limit_prefix", "must not be empty")
        check(self.max_body_bytes >= 1024, "max_body_bytes", "must be >= 1024")
        check(
            self.max_prompt_tokens >= 0, "max_prompt_tokens", "must be >= 0 (0: the model's context length)"
        )
        check(self.max_tokens >= 1, "max_tokens", "must be >= 1")
        check(self.max_inputs >= 1, "max_inputs", "must be >= 1")
        check(self.limit_concurrency >= 0, "limit_concurrency", "must be >= 0 (0: no limit)")
        check(self.max_waiting >= 0, "max_waiting", "must be >= 0 (0: no limit)")
        check(self.max_concurrent_per_key >= 0, "max_concurrent_per_key", "must be >= 0 (0: no limit)")
        check(self.header_timeout_s > 0, "header_timeout_s", "must be > 0")
        check(self.body_timeout_s > 0, "body_timeout_s", "must be > 0")
        hosts = self.allowed_hosts or []
        check(all(h and "/" not in h for h in hosts), "allowed_hosts", "names a host, e.g. llm.example.com")
        modes = ", ".join(PII_MASK_MODES)
        check(self.pii_mask in PII_MASK_MODES, "pii_mask", f"must be one of {modes}, got {self.pii_mask!r}")
        unknown = sorted(set(self.pii_types) - set(PII_TYPES))
        check(not unknown, "pii_types", f"unknown type {unknown[:1]}; known: {', '.join(PII_TYPES)}")
        check(self.log_prompt_chars >= 0, "log_prompt_chars", "must be >= 0")
        check(self.max_batch_size >= 1, "max_batch_size", "must be >= 1")
        check(1 <= self.rag_passages <= 20, "rag_passages", "must be between 1 and 20")
        check(self.num_beams >= 1, "num_beams", "must be >= 1")
        check(0 <= self.batch_window_ms <= 1000, "batch_window_ms", "must be between 0 and 1000")
        check(self.max_num_batched_tokens >= 16, "max_num_batched_tokens", "must be >= 16")
        check(self.max_model_len is None or self.max_model_len >= 16, "max_model_len", "must be >= 16")
        check(self.request_timeout_s > 0, "request_timeout_s", "must be > 0")
        check(self.drain_timeout_s >= 0, "drain_timeout_s", "must be >= 0")
        check(self.backend in ("uvicorn", "ray"), "backend", f"must be uvicorn or ray, got {self.backend!r}")
        check(self.min_replicas >= 1, "min_replicas", "must be >= 1")
        check(self.max_replicas >= self.min_replicas, "max_replicas", "must be >= --min_replicas")
        check(self.target_ongoing_requests > 0, "target_ongoing_requests", "must be > 0")
        for name in ("upscale_delay_s", "downscale_delay_s", "replica_cpus"):
            check(getattr(self, name) >= 0, name, "must be >= 0")
        check(self.look_back_period_s > 0, "look_back_period_s", "must be > 0")

    @property
    def loopback(self) -> bool:
        """Bound to a loopback address: only programs on this machine (and web pages it opens) can connect."""
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")

    @property
    def host_names(self) -> list[str] | None:
        """The Host header names accepted (lower case, no port), or None for any."""
        if self.allowed_hosts:
            return None if "*" in self.allowed_hosts else [h.lower().strip("[]") for h in self.allowed_hosts]
        return list(LOOPBACK_NAMES) if self.loopback else None

    @property
    def masks_inputs(self) -> bool:
        return self.pii_mask in ("inputs", "both")

    @property
    def masks_outputs(self) -> bool:
        return self.pii_mask in ("outputs", "both")
