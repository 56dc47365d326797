"""The FastAPI app: `create_app(config)` wires the model, security, metrics and alerts into one ASGI app.

Everything a route needs lives in one `Services` object (state.py) on `app.state.services`, built here
and injected; nothing is read from module globals, so a process can hold many apps (the tests do). The
model loads in the background once the app starts: /health answers at once, /ready and the /v1 routes
answer 503 until the model is loaded and has run one warm-up request.

Middleware, outermost first: RequestObserver (request id, drain 503s, 500s with their id, metrics, access
log), then the Gate (gate.py: Host, API key, per-key concurrency, body size and deadline). Routes: /health, /ready, /metrics, /v1/models here; the /v1 model routes
in routes.py; the page at / (a chat for decoders, a form per route for encoders) in chat/page.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from llmkernel import __version__
from llmkernel.models.loading import model_kind, resolve_model
from llmkernel.serve.alerts import AlertEvaluator, load_rules
from llmkernel.serve.chat.page import router as page_router
from llmkernel.serve.config import ServeConfig
from llmkernel.serve.encoders import EncoderModel, MicroBatcher
from llmkernel.serve.gate import (
    Gate,
    limit_request_rate,
    require_api_key,
    require_metrics_access,
)
from llmkernel.serve.limits import SharedRateLimiter, make_limiter
from llmkernel.serve.metrics import Lifecycle, Metrics, RequestObserver
from llmkernel.serve.routes import ClientGone, router
from llmkernel.serve.schemas import (
    AUTH_ERRORS,
    CLIENT_GONE,
    SURROGATE_MESSAGE,
    ApiError,
    Health,
    ModelCard,
    ModelList,
    Readiness,
)
from llmkernel.serve.security import KeyStore, PiiMasker, reload_keys, watch_keys
from llmkernel.serve.state import Services

log = logging.getLogger("llmkernel.serve")
EngineFactory = Callable[[Path, ServeConfig], Any]


def default_engine_factory(model_dir: Path, config: ServeConfig) -> Any:
    """The continuous-batching engine of serve/engine.py for a decoder folder."""
    from llmkernel.serve.engine import GenerationEngine

    return GenerationEngine(
        model_dir,
        max_batch_size=config.max_batch_size,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=config.max_model_len,
        request_timeout_s=config.request_timeout_s,
        quantize=config.quantize,
        device=config.device,
        seed=config.seed,
    )


# ---------------------------------------------------------------------------------------- model loading


def _load_model(services: Services, engine_factory: EngineFactory) -> None:
    """Load the weights (blocking; runs on a worker thread); encoders also run one warm-up pass."""
    config = services.config
    if services.index is not None and services.kind == "decoder":  # RAG: the index's encoder embeds queries
        services.query_encoder = EncoderModel(services.index.encoder, "encoder", device=config.device)
    if services.kind == "decoder":
        services.engine = engine_factory(services.model_dir, config)
        services.engine.start()
    elif services.kind == "seq2seq":  # translation: beam search behind /v1/completions (serve/seq2seq.py)
        from llmkernel.serve.seq2seq import Seq2SeqEngine

        services.engine = Seq2SeqEngine(
            services.model_dir, config.num_beams, config.request_timeout_s, config.device
        )
        services.engine.start()
    else:
        services.encoder = EncoderModel(
            services.model_dir, services.kind, device=config.device, max_batch_size=config.max_batch_size
        )
        services.encoder.warm_up(services.task)


async def _warm_up_engine(engine: Any) -> None:
    from llmkernel.serve.engine import SamplingParams

    prompt = engine.tokenizer("warm up")["input_ids"]
    async for _ in engine.submit(prompt, SamplingParams(max_tokens=1, temperature=0.0)):
        pass


async def _start_model(services: Services, engine_factory: EngineFactory) -> None:
    try:
        await asyncio.to_thread(_load_model, services, engine_factory)
        if services.engine is not None:
            await _warm_up_engine(services.engine)
            engine = services.engine
            services.metrics.track_load(lambda: engine.num_running, lambda: engine.num_waiting)
        else:
            encoder = services.encoder
            batcher = MicroBatcher(
                lambda kind, texts: getattr(encoder, kind)(texts),
                window_s=services.config.batch_window_ms / 1000,
                max_batch_size=services.config.max_batch_size,
            )
            batcher.start()
            services.batcher = batcher
            services.metrics.track_load(lambda: batcher.num_running, lambda: batcher.num_waiting)
    except Exception as error:  # the server stays up to report it on /ready; server.py exits with it
        services.load_error = f"{services.model_dir}: cannot load the model: {error}"
        services.lifecycle.status = "failed"
        log.error(services.load_error)
        if services.on_fatal is not None:
            services.on_fatal()
        return
    if services.lifecycle.status == "loading":
        services.lifecycle.status = "ready"
        log.info(f"model '{services.model_name}' ({services.task}) is ready")


async def shutdown_model(services: Services) -> None:
    """Stop the micro-batcher and the engine; the engine finishes its requests within drain_timeout_s."""
    if services.batcher is not None:
        await services.batcher.stop()
    if services.engine is not None:
        await asyncio.to_thread(services.engine.stop, services.config.drain_timeout_s)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    services: Services = app.state.services
    tasks = [asyncio.create_task(_start_model(services, app.state.engine_factory))]
    if services.keys is not None:  # revocation without a restart: the file is re-read when it changes
        tasks.append(asyncio.create_task(watch_keys(services.keys, services.limiter)))
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # main thread only
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGHUP, reload_keys, services.keys, services.limiter
            )
    if services.config.alerts:
        rules = load_rules(services.config.alerts)
        evaluator = AlertEvaluator(rules, services.metrics.registry, webhook=services.config.alert_webhook)
        tasks.append(asyncio.create_task(evaluator.run()))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await shutdown_model(services)
        if isinstance(services.limiter, SharedRateLimiter):
            services.limiter.close()  # its prober thread and its Redis connections


# ------------------------------------------------------------------------------------------ the app


def create_app(
    config: ServeConfig,
    *,
    model_dir: str | Path | None = None,
    keys: KeyStore | None = None,
    engine_factory: EngineFactory = default_engine_factory,
    clock: Callable[[], float] = time.monotonic,
) -> FastAPI:
    """The server for `model_dir` (default: `config.model`, resolved), ready to hand to uvicorn.

    `keys` default to the file `config.api_keys` names (None: no auth); `engine_factory` builds the
    generation engine for decoder folders; `clock` drives the rate limits (tests pass a fake one).
    """
    model_dir = Path(model_dir) if model_dir is not None else resolve_model(config.model)
    if keys is None and config.api_keys:
        keys = KeyStore.load(config.api_keys)
    if config.alerts:
        load_rules(config.alerts)  # a bad rules file fails here, before the server starts
    lifecycle = Lifecycle()
    metrics = Metrics()
    services = Services(
        config=config,
        model_dir=model_dir,
        model_name=config.served_model_name or _default_model_name(config.model),
        kind=model_kind(model_dir),
        keys=keys,
        limiter=make_limiter(config, keys, metrics, clock),  # shared in Redis with --rate_limit_backend
        masker=PiiMasker(config.pii_types),
        metrics=metrics,
        lifecycle=lifecycle,
        created=int(time.time()),
    )
    if config.index:  # a bad or mismatched index fails here, before the server starts
        from llmkernel.serve.search import load_index

        services.index = load_index(config.index, model_dir, services.kind)
    app = FastAPI(
        title="LLM Kernel server",
        version=__version__,
        description="OpenAI-compatible routes for a model folder written by `llmk`. See the README, section `llmk serve`.",
        lifespan=_lifespan,
    )
    app.state.services = services
    app.state.engine_factory = engine_factory
    app.add_middleware(Gate, services=services)
    app.add_middleware(
        RequestObserver, metrics=services.metrics, lifecycle=lifecycle, mask=services.masker.mask
    )
    _add_error_handlers(app)
    app.include_router(_core_routes())
    app.include_router(router)
    app.include_router(page_router)
    app.openapi = lambda: _openapi(app)
    return app


def _default_model_name(spec: str) -> str:
    """The model id clients use: the name given on the command line, without folders or .gguf."""
    name = Path(spec.rstrip("/")).name
    return name.removesuffix(".gguf") or "model"


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape; schema violations are 400 (as OpenAI answers them), not 422."""

    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = validation_message(error.errors())
        return await api_error(request, ApiError(400, message, param=param))

    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return await api_error(request, ApiError(error.status_code, str(error.detail), headers=error.headers))

    async def client_gone(request: Request, error: ClientGone) -> Response:
        return Response(status_code=CLIENT_GONE)

    # Other exceptions: RequestObserver (metrics.py) answers 500 with the request id and logs it.
    app.add_exception_handler(ClientGone, client_gone)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)


_TYPE_NAMES = {"str", "int", "float", "bool", "none", "list", "dict"}


def _field_path(loc: tuple) -> str:
    """ "messages.0.content" from pydantic's ("body", "messages", 0, "content", "str"): the union branch
    names ("str", "list[str]", "function-after[...]") are pydantic's, not the request's."""
    parts = []
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            parts.append(str(part))
        elif part.isidentifier() and part not in _TYPE_NAMES:
            parts.append(part)
    return ".".join(parts)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) in OpenAI's style for pydantic's errors: what the first wrong field must be."""
    # A union's branches each report: the branch whose type matched (a bound or a value failed) is the one
    # the client meant, and it may sit deeper (messages.0.content.0.text rather than messages.0.content).
    first = next((e for e in errors if not e["type"].endswith("_type")), errors[0])
    if first["type"] == "json_invalid":
        where = first["loc"][-1] if isinstance(first["loc"][-1], int) else "?"
        detail = first.get("ctx", {}).get("error", "decode error")
        return f"the body is not valid JSON ({detail} at character {where}); send a JSON object", None
    where = _field_path(first["loc"])
    if first["type"] == "missing":
        return f"{where} is required", where
    if first["type"] == "string_unicode":  # pydantic's own check of bounded strings
        return f"{where} {SURROGATE_MESSAGE}", where
    same = [e for e in errors if _field_path(e["loc"]) == where]
    specific = [e for e in same if not e["type"].endswith("_type")] or same
    wants = []
    for e in specific:
        text = e["msg"].removeprefix("Value error, ").replace(" after validation", "")
        for prefix, becomes in (("Input should be ", ""), ("List should ", ""), ("String should ", "")):
            if text.startswith(prefix):
                text = becomes + text.removeprefix(prefix)
        if text not in wants:
            wants.append(text)
    verb = "must be" if all(e["msg"].startswith("Input should be ") for e in specific) else "must"
    if first["type"] == "value_error":
        return f"{where or 'the body'} {wants[0]}", where or None
    return f"{where or 'the body'} {verb} {' or '.join(wants)}", where or None


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's spec without the 422 answers it adds by default: invalid requests get 400 here."""
    if app.openapi_schema is None:
        spec = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for path in spec["paths"].values():
            for operation in path.values():
                operation["responses"].pop("422", None)
        schemas = spec["components"]["schemas"]
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        _declare_limits(schemas, app.state.services.config)
        app.openapi_schema = spec
    return app.openapi_schema


def _declare_limits(schemas: dict[str, Any], config: ServeConfig) -> None:
    """Write this server's --max_tokens and --max_inputs into the request schemas as maximum/maxItems."""

    def bound(model: str, field: str, kind: str, **bounds: int) -> None:
        schema = schemas[model]["properties"][field]
        for branch in schema.get("anyOf", [schema]):
            if branch.get("type") == kind:
                branch.update(bounds)

    for model, field in [
        ("CompletionRequest", "max_tokens"),
        ("ChatCompletionRequest", "max_tokens"),
        ("ChatCompletionRequest", "max_completion_tokens"),
    ]:
        bound(model, field, "integer", maximum=config.max_tokens)
    bound("CompletionRequest", "prompt", "array", maxItems=config.max_inputs)
    for model in ("EmbeddingRequest", "ClassifyRequest", "NerRequest", "RelationRequest"):
        bound(model, "input", "array", maxItems=config.max_inputs)


def _core_routes() -> Any:
    from fastapi import APIRouter

    router = APIRouter()

    @router.get("/health", response_model=Health, tags=["probes"])
    async def health() -> Health:
        """Liveness: the process answers (no key needed)."""
        return Health()

    @router.get(
        "/ready",
        response_model=Readiness,
        responses={**AUTH_ERRORS, 503: {"model": Readiness, "description": "loading, failed or draining"}},
        tags=["probes"],
        dependencies=[Depends(require_api_key)],
    )
    async def ready(request: Request) -> Any:
        """Readiness: the model is loaded and warmed up (503 before, and while draining)."""
        services: Services = request.app.state.services
        status, reason = services.lifecycle.status, None
        if status == "failed":
            reason = services.load_error
        elif status == "ready" and (reason := services.health()) is not None:
            status = "unhealthy"  # loaded, but its engine has stopped or keeps failing
        body = Readiness(status=status, model=services.model_name, reason=reason)
        if body.status == "ready":
            return body
        return JSONResponse(body.model_dump(exclude_none=True), status_code=503)

    @router.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **AUTH_ERRORS},
        tags=["monitoring"],
        dependencies=[Depends(require_metrics_access)],
    )
    async def metrics(request: Request) -> Response:
        """Prometheus metrics of this server (llmk:*)."""
        registry = request.app.state.services.metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/models", response_model=ModelList, responses=AUTH_ERRORS, tags=["openai"])
    async def models(request: Request, key_name: Annotated[str, Depends(limit_request_rate)]) -> ModelList:
        """The one model this server serves, with its task and routes."""
        services: Services = request.app.state.services
        card = ModelCard(
            id=services.model_name,
            created=services.created,
            task=services.task,
            routes=services.routes,
            max_model_len=services.context_length if services.lifecycle.status == "ready" else None,
        )
        return ModelList(data=[card])

    return router
