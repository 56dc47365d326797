"""Request and response models of every route, in OpenAI's shapes where OpenAI has the route.

These models are the OpenAPI spec at /openapi.json: the fuzz test generates requests from it and checks
every answer against it, so a field added to a response goes here first.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmkernel.serve.text import MAX_STOP_CHARS, MAX_STOPS

# ---------------------------------------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: the official clients turn it into their typed exceptions."""

    error: ErrorDetail


CLIENT_GONE = 499  # nginx's status for "the client closed the connection before the answer"


class ApiError(Exception):
    """An error answer: status code, one-line message naming the problem and the fix, extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        # A message may quote the request: lone surrogates ("\ud800") could not be encoded as UTF-8.
        message, param = (_encodable(text) for text in (self.message, self.param))
        detail = ErrorDetail(message=message, type=self.type, param=param, code=str(self.status))
        return ErrorResponse(error=detail).model_dump()

    def asgi_messages(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """This answer as the two ASGI messages (for middleware, which runs outside FastAPI's handlers)."""
        body = json.dumps(self.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode("latin-1")) for k, v in self.headers.items()]
        start = {"type": "http.response.start", "status": self.status, "headers": headers}
        return start, {"type": "http.response.body", "body": body}


def _encodable(text: str | None) -> str | None:
    return None if text is None else text.encode("utf-8", "replace").decode("utf-8")


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"model": ErrorResponse, "description": description}
    if headers:
        response["headers"] = headers
    return response


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: _error("missing or invalid API key", {"WWW-Authenticate": {"schema": {"type": "string"}}}),
    403: _error("a Host header this server does not answer (see --allowed_hosts)"),
    408: _error("the request body did not arrive within --body_timeout_s"),
    413: _error("request body over the size limit"),
    429: _error("rate limit, per-key concurrency or the waiting queue exceeded", _RETRY_AFTER),
    503: _error("the server is loading the model, unhealthy or shutting down", _RETRY_AFTER),
}
MODEL_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("invalid request, a limit exceeded, or a route the loaded model does not serve"),
    404: _error("the requested model is not the one this server serves"),
    **AUTH_ERRORS,
    500: _error("the model failed on this request"),
    504: _error("no answer within the request deadline (--request_timeout_s plus a margin)"),
}

# ------------------------------------------------------------------------------------------ generation

# Unknown fields are ignored, and OpenAI fields this server does not implement are refused by name
# (`unsupported_field`); types are strict ("5" is not an integer, false is not a seed), as the spec says, so
# what the fuzz test calls invalid is refused.
_Request = ConfigDict(extra="allow", strict=True)
# Stop strings are matched on every generated token in the engine thread: bounded (text.py), so one
# request cannot slow the others.
_StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = _StopString | Annotated[list[_StopString], Field(max_length=MAX_STOPS)] | None
_STOP = Field(
    None,
    description=f"up to {MAX_STOPS} strings of up to {MAX_STOP_CHARS} characters that end generation; "
    "not included in the output",
)
# OpenAI fields that are not implemented, the values that mean "not used" and why a request must drop them.
UNSUPPORTED = {
    "best_of": ((None, 1), "one sequence is generated per choice"),
    "echo": ((None, False), "the prompt is not echoed"),
    "logprobs": ((None, False, 0), "log probabilities are not returned"),
    "top_logprobs": ((None, 0), "log probabilities are not returned"),
    "suffix": ((None, ""), "insertion is not supported"),
    "logit_bias": ((None, {}), "logit biases are not supported"),
    "presence_penalty": ((None, 0), "repetition penalties are not supported"),
    "frequency_penalty": ((None, 0), "repetition penalties are not supported"),
    "tools": ((None, []), "tool calls are not supported"),
    "tool_choice": ((None, "none"), "tool calls are not supported"),
    "functions": ((None, []), "function calls are not supported"),
    "function_call": ((None, "none"), "function calls are not supported"),
    "response_format": ((None, {"type": "text"}), 'only {"type": "text"} is supported'),
}


SURROGATE_MESSAGE = "holds an unpaired UTF-16 surrogate (such as \\ud800), which is not valid Unicode text"


def _check_unicode(value: Any) -> Any:
    """Refuse lone UTF-16 surrogates ("\ud800" is valid JSON but not Unicode text: the tokenizer, the
    PII detector and the log cannot encode it)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(SURROGATE_MESSAGE) from None
    elif isinstance(value, list):
        for item in value:
            _check_unicode(item)
    return value


class RequestModel(BaseModel):
    """A request body: strict types, unknown fields allowed, text checked to be valid Unicode."""

    model_config = _Request

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        return _check_unicode(value)

    def unsupported_field(self) -> tuple[str, str] | None:
        """(field, message) for the first OpenAI field sent with a value this server does not implement."""
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and value not in UNSUPPORTED[name][0]:
                return name, f"{name} is not supported by this server ({UNSUPPORTED[name][1]}); remove it"
        return None


_MAX_TOKENS = Field(
    None, ge=1, description="tokens to generate at most (bounded by the server's --max_tokens)"
)
_TEMPERATURE = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0 is greedy decoding")
_TOP_P = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="nucleus sampling mass")
_SEED = Field(None, ge=-(2**63), lt=2**64, description="seed for reproducible sampling")


class StreamOptions(RequestModel):
    include_usage: bool = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionRequest(RequestModel):
    model: str | None = Field(None, description="the served model's id (see /v1/models); optional")
    prompt: str | Annotated[list[str], Field(min_length=1)] = Field(
        description="a prompt, or a list of prompts (one choice each, up to the server's --max_inputs)"
    )
    max_tokens: int | None = _MAX_TOKENS
    temperature: float = _TEMPERATURE
    top_p: float = _TOP_P
    n: int = Field(1, ge=1, le=1, description="choices per prompt; only 1 is supported")
    seed: int | None = _SEED
    stop: Stop = _STOP
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(RequestModel):
    model: str | None = Field(None, description="the served model's id (see /v1/models); optional")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = _MAX_TOKENS
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name of max_tokens; wins if set")
    temperature: float = _TEMPERATURE
    top_p: float = _TOP_P
    n: int = Field(1, ge=1, le=1, description="choices; only 1 is supported")
    seed: int | None = _SEED
    stop: Stop = _STOP
    stream: bool = False
    stream_options: StreamOptions | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class Source(BaseModel):
    rank: int
    id: str = Field(description="the passage's document id in the index")
    score: float = Field(description="its fused (RRF) score")


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    sources: list[Source] | None = Field(
        None, description="with --index: the passages retrieved into the prompt, best first"
    )


# -------------------------------------------------------------------------------------------- encoders

Inputs = str | Annotated[list[str], Field(min_length=1)]
_INPUT = Field(description="a text or a list of texts (up to the server's --max_inputs)")


class EmbeddingRequest(RequestModel):
    model: str | None = None
    input: Inputs = _INPUT
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: little-endian float32 bytes (what the openai client asks for)"
    )
    dimensions: int | None = Field(None, ge=1, description="must equal the model's size when given")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ClassifyRequest(RequestModel):
    model: str | None = None
    input: Inputs = _INPUT
    top_k: int | None = Field(None, ge=1, description="labels per input, best first; default: all")


class LabelScore(BaseModel):
    label: str
    score: float


class Classification(BaseModel):
    index: int
    label: str = Field(description="the best label")
    score: float
    scores: list[LabelScore] = Field(description="labels with probabilities, best first")


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Classification]
    model: str
    usage: EmbeddingUsage


class NerRequest(RequestModel):
    model: str | None = None
    input: Inputs = _INPUT


class Entity(BaseModel):
    type: str = Field(description="entity type, e.g. PER (from B-PER/I-PER tags)")
    text: str
    start: int = Field(description="character offset of the first character in the input")
    end: int = Field(description="character offset just past the last character")
    score: float = Field(description="mean probability of the entity's word tags")


class NerResult(BaseModel):
    index: int
    entities: list[Entity]


class NerResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[NerResult]
    model: str
    usage: EmbeddingUsage


Span = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2)]


class RelationInput(RequestModel):
    text: str = Field(
        description="the sentence: with the entities marked inline (<e1>..</e1>, <e2>..</e2>), or plain "
        "with the spans e1 and e2"
    )
    e1: Span | None = Field(None, description="[start, end) character offsets of the first entity in text")
    e2: Span | None = Field(None, description="[start, end) character offsets of the second entity")


class RelationRequest(RequestModel):
    model: str | None = None
    input: RelationInput | Annotated[list[RelationInput], Field(min_length=1)] = Field(
        description="a sentence with two entities, or a list of them (up to the server's --max_inputs)"
    )
    top_k: int | None = Field(None, ge=1, description="labels per input, best first; default: all")


class Relation(BaseModel):
    index: int
    label: str = Field(description="the best directed label, e.g. Cause-Effect(e2,e1), or Other")
    relation: str = Field(description="its relation type, without the direction")
    direction: Literal["e1,e2", "e2,e1"] | None = Field(
        description="e1,e2: e1 is the relation's first argument (Cause-Effect(e1,e2): e1 is the cause); "
        "null for a label without a direction (Other)"
    )
    score: float = Field(description="the label's probability (softmax)")
    scores: list[LabelScore] = Field(description="labels with probabilities, best first")


class RelationResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Relation]
    model: str
    usage: EmbeddingUsage


MAX_SEARCH_K = 100  # passages one /v1/search may ask for


class SearchRequest(RequestModel):
    model: str | None = None
    query: str = Field(min_length=1, max_length=10_000, description="the text to search for")
    k: int = Field(10, ge=1, le=MAX_SEARCH_K, description="passages to return, best first")
    mode: Literal["hybrid", "dense", "bm25"] = Field(
        "hybrid", description="dense (embeddings), bm25 (words) or hybrid (reciprocal-rank fusion of both)"
    )


class Passage(BaseModel):
    rank: int
    id: str = Field(description="the document id in the index (corpus.jsonl's _id)")
    score: float = Field(description="cosine similarity (dense), BM25 score (bm25) or RRF score (hybrid)")
    text: str


class SearchResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Passage]
    model: str
    mode: str
    usage: EmbeddingUsage


# ------------------------------------------------------------------------------------- models, health


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmk"
    task: Literal["generate", "embed", "classify", "ner", "relation", "translate"]
    routes: list[str] = Field(description="the /v1 routes this model answers")
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "loading", "draining", "failed", "unhealthy"]
    model: str
    reason: str | None = Field(None, description="why the server is not ready (failed or unhealthy)")
