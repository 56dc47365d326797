"""The serving state: one `Services` object per app holds what every route uses, and which routes it serves.

`create_app` (app.py) builds it and puts it on `app.state.services`; the routes (routes.py) and the server
(server.py) read it from there. Nothing is read from module globals, so a process can hold many apps.

What a model folder serves follows its kind (`llmkernel.models.loading.model_kind`, told from the
`architectures` in its config.json): a serving mode, which /v1/models and the errors name, and its routes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkernel.serve.config import ServeConfig
from llmkernel.serve.encoders import EncoderModel, MicroBatcher
from llmkernel.serve.limits import SharedRateLimiter
from llmkernel.serve.metrics import Lifecycle, Metrics
from llmkernel.serve.schemas import ApiError
from llmkernel.serve.security import KeyStore, PiiMasker, RateLimiter

SERVING_MODES = {
    "decoder": "generate",  # *ForCausalLM: the generation engine (engine.py) runs these
    "encoder": "embed",  # BertModel, sentence-transformers such as all-MiniLM-L6-v2
    "masked_lm": "embed",  # *ForMaskedLM: embeddings from its encoder
    "classifier": "classify",  # *ForSequenceClassification: labels, and embeddings from its encoder
    "token_classifier": "ner",  # *ForTokenClassification: entity spans
    "relation_classifier": "relation",  # *ForRelationClassification: the relation between two marked entities
    "seq2seq": "translate",  # encoder-decoders (MarianMTModel, ...): source in, translation out (seq2seq.py)
}
ROUTES = {
    "generate": ["/v1/completions", "/v1/chat/completions"],
    "embed": ["/v1/embeddings"],
    "classify": ["/v1/classify", "/v1/embeddings"],
    "ner": ["/v1/ner"],
    "relation": ["/v1/relations", "/v1/embeddings"],
    "translate": ["/v1/completions"],
}
# What a route needs, for the 400 a model that does not serve it answers.
NEEDS = {
    "/v1/completions": "a decoder (*ForCausalLM) or an encoder-decoder (seq2seq)",
    "/v1/chat/completions": "a decoder (*ForCausalLM)",
    "/v1/embeddings": "an encoder (BertModel, sentence-transformers, *ForSequenceClassification)",
    "/v1/classify": "a sequence classification (*ForSequenceClassification)",
    "/v1/ner": "a token classification (*ForTokenClassification)",
    "/v1/relations": "a relation classification (*ForRelationClassification, from llmk finetune relation)",
    "/v1/search": "an index (`llmk serve ENCODER --index DIR`, built by `llmk index`) and an encoder",
}


@dataclass
class Services:
    """What the routes use: config, the loaded model, security, metrics and the server's lifecycle."""

    config: ServeConfig
    model_dir: Path
    model_name: str
    kind: str  # the folder's model kind, a key of SERVING_MODES
    keys: KeyStore | None
    limiter: RateLimiter | SharedRateLimiter  # SharedRateLimiter with --rate_limit_backend
    masker: PiiMasker
    metrics: Metrics
    lifecycle: Lifecycle
    created: int
    engine: Any = None  # GenerationEngine for decoders, Seq2SeqEngine for encoder-decoders
    encoder: EncoderModel | None = None
    batcher: MicroBatcher | None = None
    index: Any = None  # llmkernel.retrieval.index.Index with --index (serve/search.py)
    query_encoder: EncoderModel | None = None  # decoders with --index: embeds the queries of RAG
    load_error: str | None = None
    on_fatal: Callable[[], None] | None = None  # set by server.py: stop the server if loading fails

    @property
    def task(self) -> str:
        """The serving mode: generate, embed, classify or ner (a key of ROUTES)."""
        return SERVING_MODES[self.kind]

    @property
    def routes(self) -> list[str]:
        searches = self.index is not None and self.task in ("embed", "classify")
        return ROUTES[self.task] + (["/v1/search"] if searches else [])

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer if self.engine is not None else self.encoder.tokenizer

    @property
    def context_length(self) -> int:
        return self.engine.max_model_len if self.engine is not None else self.encoder.max_length

    @property
    def max_prompt_tokens(self) -> int:
        limit = self.context_length - (1 if self.engine is not None else 0)  # room for one new token
        return min(limit, self.config.max_prompt_tokens) if self.config.max_prompt_tokens else limit

    @property
    def runner(self) -> Any:
        """What runs the model: the generation engine (decoders) or the micro-batcher (encoders); None
        while loading."""
        return self.engine if self.engine is not None else self.batcher

    def health(self) -> str | None:
        """None while the loaded model answers; else why not (its engine stopped, or keeps failing)."""
        return self.runner.health() if self.runner is not None else None

    @property
    def num_waiting(self) -> int:
        """Requests queued for the model, not yet running (what --max_waiting bounds)."""
        return self.runner.num_waiting if self.runner is not None else 0

    def require(self, route: str, model: str | None) -> None:
        """Raise the ApiError for a request to `route` naming `model` that this server cannot answer now."""
        if route not in self.routes:
            raise ApiError(
                400,
                f"{route} needs {NEEDS[route]} model; '{self.model_name}' is a {self.task} model "
                f"and serves {', '.join(self.routes)}",
            )
        if model is not None and model != self.model_name:
            raise ApiError(
                404,
                f"model '{model}' is not served here; this server serves '{self.model_name}'",
                param="model",
            )
        if self.lifecycle.status != "ready":
            raise ApiError(
                503, f"the model is {self.lifecycle.status}; retry shortly", headers={"Retry-After": "5"}
            )
