"""The /v1 model routes: completions and chat (with server-sent events, grounded in an index's passages
with --index), embeddings, classify, ner, relations and search (with --index: serve/search.py).

Each route: checks the model serves it (400 otherwise), applies the limits (prompt length and max_tokens:
400 naming the flag; tokens per minute: 429), masks PII in the inputs if asked, runs the model (the
generation engine, or the encoder micro-batcher), masks PII in the outputs if asked, and leaves token
counts and a masked prompt preview on `request.state` for the access log.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from llmkernel.serve.gate import limit_request_rate, rate_limited, too_many
from llmkernel.serve.schemas import (
    MODEL_ERRORS,
    ApiError,
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Classification,
    ClassifyRequest,
    ClassifyResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    Entity,
    LabelScore,
    NerRequest,
    NerResponse,
    NerResult,
    Passage,
    Relation,
    RelationInput,
    RelationRequest,
    RelationResponse,
    SearchRequest,
    SearchResponse,
    Usage,
)
from llmkernel.serve.search import ground, search
from llmkernel.serve.state import Services

router = APIRouter(prefix="/v1", tags=["openai"])
KeyName = Annotated[str, Depends(limit_request_rate)]
# One server-sent event (OpenAPI 3.1 reads an event stream's schema as the schema of each event).
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "description": "a chunk in OpenAI's JSON format; the last event is [DONE]"}
    },
}
SSE = {
    200: {
        "content": {"text/event-stream": {"schema": SSE_EVENT}},
        "description": "with stream: true",
    }
}
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
LARGE_INPUT_CHARS = 16_384  # inputs longer than this are tokenized and masked on a worker thread
DEADLINE_MARGIN_S = 5.0  # the HTTP deadline: the engine's own --request_timeout_s, plus this
T = TypeVar("T")


def _services(request: Request) -> Services:
    return request.app.state.services


# ------------------------------------------------------------------------------------------ generation


@router.post("/completions", response_model=CompletionResponse, responses={**MODEL_ERRORS, **SSE})
async def completions(body: CompletionRequest, request: Request, key_name: KeyName) -> Any:
    """Text completion of one prompt or a list of prompts (one choice each)."""
    services = _services(request)
    _check_request(services, "/v1/completions", body)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    _check_inputs(services, prompts)
    if body.stream and len(prompts) > 1:
        raise ApiError(400, "stream: true takes one prompt; send a string, not a list", param="prompt")

    def tokenize() -> tuple[list[str], list[list[int]]]:
        texts = [_masked_input(services, prompt) for prompt in prompts]
        return texts, [services.tokenizer(text)["input_ids"] for text in texts]

    texts, prompt_ids = await _off_loop(sum(map(len, prompts)), tokenize)
    return await _generate(request, services, key_name, body, prompt_ids, texts[0], chat=False)


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses={**MODEL_ERRORS, **SSE})
async def chat_completions(body: ChatCompletionRequest, request: Request, key_name: KeyName) -> Any:
    """Chat completion with the model's chat template."""
    services = _services(request)
    _check_request(services, "/v1/chat/completions", body)
    tokenizer = services.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, f"'{services.model_name}' has no chat template; use /v1/completions")

    size = sum(len(m.text()) for m in body.messages)

    def mask() -> list[dict[str, str]]:
        return [{"role": m.role, "content": _masked_input(services, m.text())} for m in body.messages]

    def tokenize(messages: list[dict[str, str]]) -> list[int]:
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # a template may reject a role order, e.g. two user turns
            raise ApiError(
                400, f"the chat template rejected these messages: {error}", param="messages"
            ) from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    messages = await _off_loop(size, mask)
    preview, sources = messages[-1]["content"], None
    if services.index is not None:  # RAG: the passages the last user message retrieves, put in the prompt
        messages, sources = await ground(services, messages)
    prompt_ids = await _off_loop(size, lambda: tokenize(messages))
    return await _generate(
        request, services, key_name, body, [prompt_ids], preview, chat=True, sources=sources
    )


def _check_request(services: Services, route: str, body: Any) -> None:
    """ApiError unless this server serves `route` now for the model named and every field sent."""
    services.require(route, body.model)
    if (unsupported := body.unsupported_field()) is not None:
        raise ApiError(400, unsupported[1], param=unsupported[0])


def _masked_input(services: Services, text: str) -> str:
    return services.masker.mask(text) if services.config.masks_inputs else text


async def _off_loop(size: int, work: Callable[[], T]) -> T:
    """Run `work` (tokenizing, masking) on a worker thread when the input is large, so that a 1 MiB body
    does not hold up every other request on the event loop (on 2 cores: ~0.3 s per MiB to tokenize)."""
    return await asyncio.to_thread(work) if size > LARGE_INPUT_CHARS else work()


def _check_queue(services: Services, count: int) -> None:
    """ApiError(429) when `count` more requests would queue past --max_waiting."""
    limit, waiting = services.config.max_waiting, services.num_waiting
    if limit and waiting + count > limit:
        services.metrics.rate_limited.inc()
        raise too_many(
            f"{waiting} requests are waiting for the model, the most this server queues (--max_waiting); "
            "retry shortly"
        )


class ClientGone(Exception):
    """The client closed the connection before its answer was ready (app.py answers it with a 499 that
    nobody reads, for the access log)."""


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _watched(request: Request, services: Services, work: Awaitable[T]) -> T:
    """`work`'s result, unless the client leaves first (ClientGone) or the HTTP deadline passes (504);
    either way `work` is cancelled, which frees what it holds (as vLLM's `with_cancellation`)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    timeout = _http_deadline(services)
    try:
        done, _ = await asyncio.wait({task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            pending.cancel()
    if task in done:
        return task.result()
    await asyncio.gather(task, return_exceptions=True)  # let the work's own clean-up run
    if watcher in done:
        raise ClientGone
    raise _deadline_passed(timeout)


def _http_deadline(services: Services) -> float:
    """The engine ends requests at --request_timeout_s; this deadline holds if the engine cannot."""
    timeout = services.config.request_timeout_s
    return timeout + min(DEADLINE_MARGIN_S, timeout)


def _deadline_passed(timeout: float) -> ApiError:
    return ApiError(
        504,
        f"no answer within {timeout:g} s (--request_timeout_s plus a margin); the model may be overloaded "
        "or stuck, see /ready",
    )


def _max_tokens(services: Services, body: Any, prompt_ids: list[list[int]], chat: bool) -> int:
    """The request's max_tokens after the server's limits; ApiError(400) naming the limit it breaks."""
    limit = services.config.max_tokens
    asked = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
    if asked is not None and asked > limit:
        raise ApiError(
            400,
            f"max_tokens {asked} is over this server's limit of {limit} (--max_tokens)",
            param="max_tokens",
        )
    if min(len(ids) for ids in prompt_ids) == 0:
        raise ApiError(
            400, "the prompt is empty (no tokens); send some text", param="messages" if chat else "prompt"
        )
    longest = max(len(ids) for ids in prompt_ids)
    if longest > services.max_prompt_tokens:
        raise ApiError(
            400,
            f"the prompt has {longest} tokens, over the limit of {services.max_prompt_tokens} "
            "(--max_prompt_tokens, or the model's context length)",
            param="messages" if chat else "prompt",
        )
    room = services.context_length - longest
    if asked is None:  # chat: what the context has left, up to the server's limit; completions: 16
        return min(room, limit if chat else min(limit, DEFAULT_COMPLETION_TOKENS))
    if asked > room:
        raise ApiError(
            400,
            f"prompt ({longest} tokens) + max_tokens ({asked}) is over the context length of "
            f"{services.context_length}; lower max_tokens",
            param="max_tokens",
        )
    return asked


async def _generate(
    request: Request,
    services: Services,
    key_name: str,
    body: Any,
    prompt_ids: list[list[int]],
    preview: str,
    chat: bool,
    sources: list[dict] | None = None,
) -> Any:
    from llmkernel.serve.engine import SamplingParams

    max_tokens = _max_tokens(services, body, prompt_ids, chat)
    stop = [text for text in ([body.stop] if isinstance(body.stop, str) else body.stop or []) if text]
    _check_queue(services, len(prompt_ids))
    reserved = sum(len(ids) + max_tokens for ids in prompt_ids)
    _reserve_tokens(services, key_name, reserved)
    request.state.prompt_tokens = sum(len(ids) for ids in prompt_ids)
    request.state.prompt_preview = services.masker.preview(preview, services.config.log_prompt_chars)
    seed = body.seed % 2**63 if body.seed is not None else None
    params = SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=seed, stop=stop
    )
    handles = []
    try:
        for ids in prompt_ids:
            handles.append(services.engine.submit(ids, params, loop=asyncio.get_running_loop()))
    except (ValueError, RuntimeError) as error:  # the engine's own checks, or it is stopping
        for handle in handles:
            handle.cancel()
        services.limiter.refund_tokens(key_name, reserved)
        status = 400 if isinstance(error, ValueError) else 503
        raise ApiError(status, str(error), headers={"Retry-After": "1"} if status == 503 else None) from None
    meta = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": services.model_name,
    }
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(
            request, services, key_name, handles[0], reserved, meta, chat, include_usage, sources
        )
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    try:
        work = asyncio.gather(*(_collect(services, handle) for handle in handles))
        results = await _watched(request, services, work)
    finally:
        for handle in handles:
            handle.cancel()  # no-op for finished requests; frees the slot if the client went away
        _account(request, services, key_name, handles, reserved)
    if any(reason == "error" for _, reason in results):
        raise ApiError(500, "generation failed on this request")
    usage = _usage(handles)
    if chat:
        choices = [
            ChatChoice(index=0, message=AssistantMessage(content=results[0][0]), finish_reason=results[0][1])
        ]
        return ChatCompletionResponse(**meta, choices=choices, usage=usage, sources=sources)
    choices = [
        CompletionChoice(index=i, text=text, finish_reason=reason) for i, (text, reason) in enumerate(results)
    ]
    return CompletionResponse(**meta, choices=choices, usage=usage)


def _reserve_tokens(services: Services, key_name: str, amount: int) -> None:
    limit = services.limiter.token_limit(key_name)
    if limit and amount > limit:
        raise ApiError(
            400,
            f"this request may use {amount} tokens (prompt + max_tokens), over the "
            f"per-minute limit of {limit} (--tokens_per_minute); lower max_tokens",
        )
    wait = services.limiter.reserve_tokens(key_name, amount)
    if wait > 0:
        services.metrics.rate_limited.inc()
        raise rate_limited(wait, "tokens per minute")


async def _collect(services: Services, handle: Any) -> tuple[str, str | None]:
    parts, reason = [], None
    async for event in handle:
        parts.append(event.text)
        reason = event.finish_reason or reason
    text = "".join(parts)
    return (services.masker.mask(text) if services.config.masks_outputs else text), reason


def _usage(handles: list[Any]) -> Usage:
    prompt = sum(h.prompt_tokens for h in handles)
    completion = sum(h.completion_tokens for h in handles)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _account(request: Request, services: Services, key_name: str, handles: list[Any], reserved: int) -> None:
    """Metrics, the token bucket refund and the access log's counts, once the requests are over."""
    usage = _usage(handles)
    services.metrics.prompt_tokens.inc(usage.prompt_tokens)
    services.metrics.generation_tokens.inc(usage.completion_tokens)
    for handle in handles:
        if handle.time_to_first_token is not None:
            services.metrics.time_to_first_token.observe(handle.time_to_first_token)
    services.limiter.refund_tokens(key_name, reserved - usage.total_tokens)
    request.state.completion_tokens = usage.completion_tokens


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(
    request: Request,
    services: Services,
    key_name: str,
    handle: Any,
    reserved: int,
    meta: dict[str, Any],
    chat: bool,
    include_usage: bool,
    sources: list[dict] | None = None,
) -> AsyncIterator[str]:
    """OpenAI's chunk format: one `data: {json}` event per piece of text, a last chunk with the
    finish_reason, an optional usage chunk, then `data: [DONE]`. Output masking holds back a short tail.
    With --index, the first chunk also holds the retrieved passages' `sources`."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    masker = services.masker.stream() if services.config.masks_outputs else None

    def chunk(text: str | None, reason: str | None = None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        extra = {"sources": sources} if role and sources is not None else {}
        return _sse({**meta, "object": kind, "choices": [choice], **extra})

    reason = None
    timeout = _http_deadline(services)
    # One timer, not a timeout per token: the stream ends with "deadline" if the engine does not end it.
    timer = asyncio.get_running_loop().call_later(timeout, handle.expire)
    try:
        if chat:
            yield chunk(None, role=True)
        async for event in handle:
            reason = event.finish_reason or reason
            if reason == "deadline":
                break
            text = masker.feed(event.text) if masker else event.text
            if text:
                yield chunk(text)
        if reason == "deadline":
            yield _sse(_deadline_passed(timeout).body())
        elif reason == "error":
            yield _sse(ApiError(500, "generation failed on this request").body())
        else:
            yield chunk(masker.flush() if masker else "", reason)
        if include_usage:
            yield _sse({**meta, "object": kind, "choices": [], "usage": _usage([handle]).model_dump()})
        yield _sse("[DONE]")
    finally:
        timer.cancel()
        handle.cancel()  # the client left mid-stream: stop generating for it
        _account(request, services, key_name, [handle], reserved)


# -------------------------------------------------------------------------------------------- encoders


def _check_inputs(services: Services, texts: list[str]) -> None:
    if not texts:
        raise ApiError(400, "input is an empty list; send a text or a list of texts", param="input")
    if len(texts) > services.config.max_inputs:
        raise ApiError(
            400,
            f"{len(texts)} inputs is over this server's limit of {services.config.max_inputs} (--max_inputs)",
            param="input",
        )


async def _encode(
    request: Request, services: Services, key_name: str, kind: str, inputs: str | list[str]
) -> tuple[list, int]:
    """Run `kind` (embed, classify, ner) on the inputs through the micro-batcher; (results, token count)."""
    texts = [inputs] if isinstance(inputs, str) else inputs
    _check_inputs(services, texts)

    def tokenize() -> tuple[list[str], list[int]]:
        masked = [_masked_input(services, text) for text in texts]
        return masked, services.encoder.count_tokens(masked)

    texts, counts = await _off_loop(sum(map(len, texts)), tokenize)
    if max(counts) > services.max_prompt_tokens:
        raise ApiError(
            400,
            f"an input has {max(counts)} tokens, over the limit of {services.max_prompt_tokens} "
            "(--max_prompt_tokens, or the model's maximum length)",
            param="input",
        )
    tokens = sum(counts)
    _check_queue(services, 1)
    _reserve_tokens(services, key_name, tokens)  # the exact count: nothing to refund afterwards
    request.state.prompt_tokens = tokens
    request.state.prompt_preview = services.masker.preview(texts[0], services.config.log_prompt_chars)
    services.metrics.prompt_tokens.inc(tokens)
    return await _watched(request, services, services.batcher.submit(kind, texts)), tokens


@router.post("/embeddings", response_model=EmbeddingResponse, responses=MODEL_ERRORS)
async def embeddings(body: EmbeddingRequest, request: Request, key_name: KeyName) -> EmbeddingResponse:
    """Sentence embeddings: mean-pooled, L2-normalised last hidden states (float or base64 float32)."""
    services = _services(request)
    _check_request(services, "/v1/embeddings", body)
    hidden_size = services.encoder.model.config.hidden_size
    if body.dimensions is not None and body.dimensions != hidden_size:
        raise ApiError(
            400,
            f"this model's embeddings have {hidden_size} dimensions; omit dimensions or send {hidden_size}",
            param="dimensions",
        )
    vectors, tokens = await _encode(request, services, key_name, "embed", body.input)
    if body.encoding_format == "base64":
        encoded = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() for v in vectors]
        data = [Embedding(index=i, embedding=e) for i, e in enumerate(encoded)]
    else:
        data = [Embedding(index=i, embedding=v) for i, v in enumerate(vectors)]
    usage = EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    return EmbeddingResponse(data=data, model=services.model_name, usage=usage)


@router.post("/classify", response_model=ClassifyResponse, responses=MODEL_ERRORS)
async def classify(body: ClassifyRequest, request: Request, key_name: KeyName) -> ClassifyResponse:
    """Labels with probabilities for each input, best first."""
    services = _services(request)
    _check_request(services, "/v1/classify", body)
    results, tokens = await _encode(request, services, key_name, "classify", body.input)
    data = []
    for i, pairs in enumerate(results):
        scores = [LabelScore(label=label, score=score) for label, score in pairs[: body.top_k]]
        data.append(Classification(index=i, label=scores[0].label, score=scores[0].score, scores=scores))
    usage = EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    return ClassifyResponse(data=data, model=services.model_name, usage=usage)


@router.post("/ner", response_model=NerResponse, responses=MODEL_ERRORS)
async def ner(body: NerRequest, request: Request, key_name: KeyName) -> NerResponse:
    """Named entities with types and character offsets (BIO tags merged into spans)."""
    services = _services(request)
    _check_request(services, "/v1/ner", body)
    results, tokens = await _encode(request, services, key_name, "ner", body.input)
    data = [
        NerResult(index=i, entities=[Entity(**e) for e in entities]) for i, entities in enumerate(results)
    ]
    usage = EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    return NerResponse(data=data, model=services.model_name, usage=usage)


def _marked_text(item: RelationInput, index: int, count: int) -> str:
    """The input's text with both entities marked inline; ApiError(400) naming what is wrong."""
    from llmkernel.tasks.relation import check_marked, mark_spans

    where = f"input[{index}]" if count > 1 else "input"
    try:
        if item.e1 is not None or item.e2 is not None:
            if item.e1 is None or item.e2 is None:
                raise ValueError(f"only {'e1' if item.e2 is None else 'e2'} is given; send both spans")
            return mark_spans(item.text, item.e1, item.e2)
        check_marked(item.text)
    except ValueError as error:
        raise ApiError(400, f"{where}: {error}", param="input") from None
    return item.text


@router.post("/relations", response_model=RelationResponse, responses=MODEL_ERRORS)
async def relations(body: RelationRequest, request: Request, key_name: KeyName) -> RelationResponse:
    """The relation between two marked entities of each input: directed label, type, direction and score."""
    from llmkernel.tasks.metrics import relation_type

    services = _services(request)
    _check_request(services, "/v1/relations", body)
    items = [body.input] if isinstance(body.input, RelationInput) else body.input
    _check_inputs(services, items)
    texts = [_marked_text(item, i, len(items)) for i, item in enumerate(items)]
    results, tokens = await _encode(request, services, key_name, "relation", texts)
    data = []
    for i, pairs in enumerate(results):
        scores = [LabelScore(label=label, score=score) for label, score in pairs[: body.top_k]]
        label = scores[0].label
        direction = label[-6:-1] if label.endswith(("(e1,e2)", "(e2,e1)")) else None
        data.append(
            Relation(index=i, label=label, relation=relation_type(label), direction=direction,
                     score=scores[0].score, scores=scores)
        )  # fmt: skip
    usage = EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    return RelationResponse(data=data, model=services.model_name, usage=usage)


@router.post("/search", response_model=SearchResponse, responses=MODEL_ERRORS)
async def search_passages(body: SearchRequest, request: Request, key_name: KeyName) -> SearchResponse:
    """The top-k passages of the index for a query: dense, bm25 or hybrid (reciprocal-rank fusion)."""
    services = _services(request)
    _check_request(services, "/v1/search", body)
    if not body.query.strip():
        raise ApiError(400, "query is blank; send the text to search for", param="query")
    # The query is embedded like /v1/embeddings (micro-batched, its tokens counted against the limits).
    vectors, tokens = await _encode(request, services, key_name, "embed", body.query)
    passages = await search(services, body.query, vectors[0], body.k, body.mode)
    usage = EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    return SearchResponse(
        data=[Passage(**p) for p in passages], model=services.model_name, mode=body.mode, usage=usage
    )
