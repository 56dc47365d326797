"""`llmk evaluate` on a retrieval set: an encoder (or an index folder) on a BEIR folder's split.

Three rankings of the whole corpus for every judged query of `--split` (test by default): dense (the
encoder's cosine similarities, exact search), bm25 (bm25s) and hybrid (reciprocal-rank fusion of the two,
k = 60). Each gets nDCG@10, recall@100 and MRR@10 from ranx; eval.json holds all three and the table is
printed. Given an index folder, its vectors and BM25 index are used as they are (its corpus must hold every
judged document); given an encoder, the corpus is embedded and indexed in memory first.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from llmkernel.config import to_dict
from llmkernel.errors import InputError
from llmkernel.io.beir import is_beir_folder, read_beir
from llmkernel.models.loading import load_model, load_tokenizer_for, model_kind, resolve_model
from llmkernel.retrieval.bm25 import BM25
from llmkernel.retrieval.fusion import RRF_K, reciprocal_rank_fusion
from llmkernel.retrieval.index import FUSION_DEPTH, MODES, Index, is_index_folder
from llmkernel.runs import (
    Manifest,
    atomic_write_json,
    describe_inputs,
    fingerprint,
    is_up_to_date,
    staging_folder,
)
from llmkernel.runtime import configure_threads, default_device
from llmkernel.tasks.embed import QUERY_MAX_LENGTH, TOP_K, embed_texts, sentence_max_length, top_k
from llmkernel.tasks.metrics import RANKING_METRICS, ranking_metrics

STAGE = "evaluate"


def evaluate_retrieval(config: Any) -> dict[str, Any]:
    """Dense, BM25 and hybrid metrics of `config.model` (encoder or index folder) on `config.data`."""
    started = time.time()
    if not is_beir_folder(config.data):
        raise InputError(
            f"{config.data}: not a BEIR folder (corpus.jsonl, queries.jsonl, qrels/{config.split}.tsv); "
            "an index folder is evaluated on one"
        )
    index = Index(config.model) if is_index_folder(config.model) else None
    folder = resolve_model(index.encoder if index else config.model)
    if model_kind(folder) == "decoder":
        raise InputError(f"{folder} is a decoder; retrieval is evaluated with an encoder or an index folder")
    retrieval = read_beir(config.data, config.split)  # every id checked before any model loads
    if index is not None:
        known = set(index.ids)
        missing = next((d for docs in retrieval.qrels.values() for d in docs if d not in known), None)
        if missing is not None:
            raise InputError(
                f"{config.model}: document {missing!r} judged in {config.data} is not in the index; "
                "index that folder's corpus (`llmk index ENCODER DATA`)"
            )
    if config.limit:
        kept = list(retrieval.qrels)[: config.limit]
        retrieval.qrels = {q: retrieval.qrels[q] for q in kept}
        retrieval.queries = {q: retrieval.queries[q] for q in kept}
    out = Path(config.out)
    sources = [Path(config.data)] + ([Path(config.model) / "vectors.npy"] if index else [])
    inputs = describe_inputs(
        [*sources, *sorted(p for p in folder.iterdir() if p.is_file() and p.name != "run.json")]
    )
    run_fingerprint = fingerprint(to_dict(config), inputs, ("out", "force", "progress", "threads"))
    if not config.force and is_up_to_date(out, STAGE, run_fingerprint):
        print(f"{out} is up to date (same model, data and settings); --force evaluates again")
        return json.loads((out / "eval.json").read_text(encoding="utf-8"))

    configure_threads(config.threads, 1)
    device = default_device()
    model = load_model(folder, "encoder").to(device).eval()
    encoder, tokenizer = getattr(model, "base_model", model), load_tokenizer_for(folder)
    query_ids = list(retrieval.queries)
    queries = [retrieval.queries[q] for q in query_ids]
    began = time.perf_counter()
    if index is None:
        doc_ids = list(retrieval.corpus)
        texts = [retrieval.corpus[d] for d in doc_ids]
        max_length = config.max_length or min(sentence_max_length(folder), tokenizer.model_max_length)
        vectors = embed_texts(
            encoder, tokenizer, texts, max_length, device, config.batch_size, config.progress, "corpus"
        )
        bm25 = BM25.build(texts)
    else:
        doc_ids, vectors, bm25 = index.ids, index.vectors, index.bm25
    index_seconds = time.perf_counter() - began
    query_vectors = embed_texts(encoder, tokenizer, queries, QUERY_MAX_LENGTH, device, config.batch_size)
    depth = max(TOP_K, FUSION_DEPTH)
    if index is not None:
        dense = index.dense(query_vectors, depth)
    else:
        scores, indices = top_k(query_vectors, vectors, depth)
        dense = [list(zip(row.tolist(), values.tolist())) for row, values in zip(indices, scores)]
    lexical = bm25.search(queries, depth)
    hybrid = [reciprocal_rank_fusion([d, b], RRF_K, top=TOP_K) for d, b in zip(dense, lexical)]
    report: dict[str, Any] = {"task": "retrieval", "model": str(folder), "data": str(config.data)}
    if index is not None:
        report["index"] = str(config.model)
    for mode, hits in zip(MODES, (dense, lexical, hybrid)):
        run = {q: {doc_ids[d]: s for d, s in row[:TOP_K]} for q, row in zip(query_ids, hits)}
        report[mode] = ranking_metrics(retrieval.qrels, run)
    report.update(
        split=config.split,
        queries=len(query_ids),
        documents=len(doc_ids),
        rrf_k=RRF_K,
        index_seconds=round(index_seconds, 2),
        search_seconds=round(time.perf_counter() - began - index_seconds, 2),
    )
    # flat too (dense_ndcg_at_10, ...): what run.json's metrics and `llmk report`'s tables show
    metrics = {f"{mode}_{name}": report[mode][name] for mode in MODES for name in RANKING_METRICS}
    report.update(metrics)
    with staging_folder(out) as stage:
        atomic_write_json(stage / "eval.json", report)
        Manifest(STAGE, to_dict(config), inputs, run_fingerprint, started_at=started, metrics=metrics).write(
            stage
        )
    print(format_table(report))
    print(f"eval.json and run.json written to {out}")
    return report


def format_table(report: dict[str, Any]) -> str:
    """The three rankings' metrics, one row each."""
    names = list(RANKING_METRICS.values())
    lines = [
        f"{report['queries']} queries ({report['split']}), {report['documents']:,} documents",
        f"{'ranking':>8}  " + "  ".join(f"{name:>10}" for name in names),
    ]
    for mode in MODES:
        lines.append(f"{mode:>8}  " + "  ".join(f"{report[mode][key]:>10.4f}" for key in RANKING_METRICS))
    return "\n".join(lines)
