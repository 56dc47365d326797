"""The `llmk index` config: the schema of `llmk index --help`, YAML recipes and the saved run.json."""

from __future__ import annotations

from dataclasses import dataclass

from llmkernel.config import check, option

APPROXIMATE = ("auto", "true", "false")
# Documents beyond which `--approximate auto` builds an HNSW index. Exact search of one query (384
# dimensions, a matrix-vector product and a top-k, 2 shared cores, 2026-12-03): 0.3 ms over SciFact's 5,183
# vectors, 60-100 ms over 100k, 0.7-1.1 s over 1M (memory-bound: every vector is read per query). Past
# ~50k exact search alone takes most of /v1/search's 50 ms budget.
APPROXIMATE_ABOVE = 50_000
RUN_ONLY_FIELDS = ("out", "force", "progress", "threads")


@dataclass
class IndexConfig:
    """`llmk index ENCODER CORPUS`: embed a corpus into a search index (vectors, ids, BM25, settings)."""

    encoder: str = option(
        "", "encoder folder (llmk finetune embed, any HF encoder) or all-minilm-l6-v2", positional=True
    )
    corpus: str = option(
        "", "a BEIR folder (its corpus.jsonl) or a corpus.jsonl file (_id, title, text)", positional=True
    )
    out: str = option(
        "runs/index", "output folder: vectors.npy, ids.json, documents.jsonl, bm25/, index.json"
    )
    batch_size: int = option(64, "documents per forward pass")
    max_length: int = option(0, "tokens per document kept (0: the encoder's max_seq_length, else 256)")
    approximate: str = option(
        "auto",
        f"also build an HNSW index with faiss (the faiss extra): true, false, or auto (beyond "
        f"{APPROXIMATE_ABOVE:,} documents, where exact search stops being fast)",
    )
    hnsw_neighbors: int = option(32, "HNSW: links per vector (faiss M)")
    hnsw_ef_search: int = option(128, "HNSW: candidates explored per query (faiss efSearch)")
    bm25_k1: float = option(1.2, "BM25 term-frequency saturation k1 (Lucene's default)")
    bm25_b: float = option(0.75, "BM25 length normalisation b (Lucene's default)")
    threads: int = option(0, "CPU threads (0: all cores)")
    force: bool = option(False, "build again even when --out holds this index of the same encoder and corpus")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        check(
            bool(self.encoder),
            "encoder",
            "required: the encoder folder, e.g. `llmk index all-minilm-l6-v2 CORPUS`",
        )
        check(bool(self.corpus), "corpus", "required: a BEIR folder or corpus.jsonl (the second argument)")
        self.approximate = str(self.approximate).lower()
        check(self.approximate in APPROXIMATE, "approximate", "must be auto, true or false")
        for name in ("batch_size", "hnsw_neighbors", "hnsw_ef_search"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("max_length", "threads"):
            check(getattr(self, name) >= 0, name, "must be >= 0")
        check(self.bm25_k1 >= 0, "bm25_k1", "must be >= 0")
        check(0 <= self.bm25_b <= 1, "bm25_b", "must be between 0 and 1")
