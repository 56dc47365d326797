"""Search and retrieval-augmented chat for `llmk serve MODEL --index DIR` (an index from `llmk index`).

* An encoder server gets `/v1/search`: the query is embedded by the served encoder (through the same
  micro-batcher as /v1/embeddings), then ranked dense, bm25 or hybrid (RRF) over the index
  (llmkernel.retrieval); the answer holds the top-k passages with ids, scores and text. The index must
  have been built with the served encoder (its vectors live in that encoder's space).
* A decoder server grounds its chat answers: the last user message is searched (hybrid; the index's own
  encoder embeds it), the top `--rag_passages` passages go into a system message ahead of the
  conversation, and the answer lists their ids in `sources`, beside `choices`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from llmkernel.errors import InputError

RAG_PASSAGE_CHARS = 1200  # each passage put into the prompt is cut to this many characters
RAG_INSTRUCTIONS = (
    "Answer the user's question using the passages below. Cite the passages you use by their number, "
    "like [1]. If they do not answer the question, say so."
)


def load_index(index_dir: str | Path, model_dir: Path, kind: str) -> Any:
    """The index folder loaded (llmkernel.retrieval.index.Index); InputError when it is broken, or when an
    encoder server serves another encoder than the one that built it (a decoder embeds its queries with
    the index's own encoder, loaded with the model: app.py)."""
    from llmkernel.retrieval.index import Index

    index = Index(index_dir)
    if kind not in ("decoder", "encoder", "masked_lm", "classifier"):
        raise InputError(f"--index: {model_dir} is a {kind} model; search needs an encoder, RAG a decoder")
    if kind != "decoder" and Path(index.encoder).resolve() != Path(model_dir).resolve():
        raise InputError(
            f"--index {index_dir} was built with the encoder {index.encoder}, not {model_dir}; serve that "
            "encoder, or index the corpus with this one (`llmk index MODEL CORPUS`)"
        )
    return index


async def search(services: Any, query: str, vector: list[float] | None, k: int, mode: str) -> list[dict]:
    """The `k` best passages for `query` (and its embedding, for dense and hybrid) as dicts."""
    import numpy as np

    index = services.index
    vectors = None if vector is None else np.asarray([vector], dtype=np.float32)
    hits = (await asyncio.to_thread(index.search, [query], vectors, k, mode))[0]
    return [
        {"rank": rank, "id": index.ids[d], "score": score, "text": index.texts[d]}
        for rank, (d, score) in enumerate(hits, 1)
    ]


async def ground(services: Any, messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict]]:
    """(messages with the retrieved passages in a system message first, the passages' sources)."""
    question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    if not question.strip():
        return messages, []
    vector = (await asyncio.to_thread(services.query_encoder.embed, [question]))[0]
    passages = await search(services, question, vector, services.config.rag_passages, "hybrid")
    context = "\n\n".join(f"[{p['rank']}] {p['text'][:RAG_PASSAGE_CHARS]}" for p in passages)
    system = {"role": "system", "content": f"{RAG_INSTRUCTIONS}\n\n{context}"}
    if messages and messages[0]["role"] in ("system", "developer"):
        system["content"] = f"{messages[0]['content']}\n\n{system['content']}"
        messages = messages[1:]
    sources = [{"rank": p["rank"], "id": p["id"], "score": p["score"]} for p in passages]
    return [system, *messages], sources
