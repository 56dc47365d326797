"""`llmk index ENCODER CORPUS --out DIR`: embed a corpus into an index folder (layout: index.py).

Read top to bottom: read the corpus (a BEIR folder or a corpus.jsonl), load the encoder through the one
loader, embed every document (title + text, batched, longest first, a progress bar with ETA), build the
BM25 index of the same texts, optionally the HNSW graph, and write it all into a staging folder that
becomes `--out` only when complete, with index.json and run.json. The same encoder, corpus and settings
again is "up to date".
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmkernel.config import to_dict
from llmkernel.errors import InputError, optional_import
from llmkernel.io.beir import CORPUS, read_corpus
from llmkernel.models.loading import load_model, load_tokenizer_for, model_kind, resolve_model
from llmkernel.retrieval.bm25 import BM25
from llmkernel.retrieval.config import APPROXIMATE_ABOVE, RUN_ONLY_FIELDS, IndexConfig
from llmkernel.retrieval.index import INDEX_FILE
from llmkernel.runs import (
    Manifest,
    atomic_write_json,
    describe_inputs,
    fingerprint,
    is_up_to_date,
    staging_folder,
)
from llmkernel.runtime import configure_threads, default_device
from llmkernel.tasks.embed import embed_texts, sentence_max_length

STAGE = "index"


def corpus_file(path: str | Path) -> Path:
    """The corpus.jsonl of a BEIR folder, or the jsonl file itself; InputError when there is none."""
    path = Path(path)
    file = path / CORPUS if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"{file}: no such file; pass a BEIR folder (with {CORPUS}) or a corpus .jsonl file")
    return file


def build_index(config: IndexConfig) -> dict[str, Any]:
    """Run `llmk index`; returns the index's figures (also in run.json)."""
    started = time.time()
    source = corpus_file(config.corpus)  # inputs first: a missing corpus before loading anything
    folder = resolve_model(config.encoder)
    kind = model_kind(folder)
    if kind == "decoder":
        raise InputError(
            f"{folder} is a decoder; index with an encoder (all-minilm-l6-v2, llmk finetune embed)"
        )
    out = Path(config.out)
    model_files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "run.json")
    inputs = describe_inputs([source, *model_files])
    run_fingerprint = fingerprint(to_dict(config), inputs, RUN_ONLY_FIELDS)
    if not config.force and is_up_to_date(out, STAGE, run_fingerprint):
        print(f"{out} is up to date (same encoder, corpus and settings); --force builds it again")
        return json.loads((out / INDEX_FILE).read_text(encoding="utf-8"))

    corpus = read_corpus(source)
    ids, texts = list(corpus), list(corpus.values())
    approximate = config.approximate == "true" or (
        config.approximate == "auto" and len(ids) > APPROXIMATE_ABOVE
    )
    faiss = optional_import("faiss", "faiss") if approximate else None
    configure_threads(config.threads, 1)
    device = default_device()
    model = load_model(folder, "encoder").to(device).eval()  # a classifier's encoder serves too
    encoder = getattr(model, "base_model", model)
    tokenizer = load_tokenizer_for(folder)
    max_length = config.max_length or min(sentence_max_length(folder), tokenizer.model_max_length)
    print(f"embedding {len(ids):,} documents from {source} with {folder.name} (max length {max_length})")
    began = time.perf_counter()
    vectors = embed_texts(
        encoder, tokenizer, texts, max_length, device, config.batch_size, config.progress, "embedding"
    )
    embed_seconds = time.perf_counter() - began
    meta = {
        "encoder": str(folder.resolve()),
        "pooling": "mean",
        "normalized": True,
        "max_length": max_length,
        "dimensions": int(vectors.shape[1]),
        "documents": len(ids),
        "corpus": str(source),
        "approximate": approximate,
        "hnsw_neighbors": config.hnsw_neighbors,
        "hnsw_ef_search": config.hnsw_ef_search,
        "bm25": {"k1": config.bm25_k1, "b": config.bm25_b, "stemmer": "english", "stopwords": "en"},
        "embed_seconds": round(embed_seconds, 2),
        "documents_per_s": round(len(ids) / max(embed_seconds, 1e-9), 1),
    }
    with staging_folder(out) as stage:
        np.save(stage / "vectors.npy", vectors)
        atomic_write_json(stage / "ids.json", ids)
        with open(stage / "documents.jsonl", "w", encoding="utf-8") as handle:
            for doc_id, text in zip(ids, texts):
                handle.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
        BM25.build(texts, config.bm25_k1, config.bm25_b).save(stage / "bm25")
        if faiss is not None:
            graph = faiss.IndexHNSWFlat(vectors.shape[1], config.hnsw_neighbors, faiss.METRIC_INNER_PRODUCT)
            graph.add(vectors)
            faiss.write_index(graph, str(stage / "hnsw.faiss"))
        atomic_write_json(stage / INDEX_FILE, meta)
        metrics = {k: meta[k] for k in ("documents", "dimensions", "embed_seconds", "documents_per_s")}
        Manifest(STAGE, to_dict(config), inputs, run_fingerprint, started_at=started, metrics=metrics).write(
            stage
        )
    print(
        f"index of {len(ids):,} documents written to {out} ({embed_seconds:.0f} s embedding, "
        f"{meta['documents_per_s']:.0f} documents/s; {'exact + HNSW' if approximate else 'exact'} search, BM25)"
    )
    return meta
