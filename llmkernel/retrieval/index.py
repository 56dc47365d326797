"""Index folders: what `llmk index` writes and what search, `llmk evaluate` and `llmk serve --index` read.

  DIR/  vectors.npy      (documents, dimensions) float32 unit vectors, in the order of ids.json
        ids.json         the document ids
        documents.jsonl  {"id", "text"} per document (what /v1/search returns and RAG puts in the prompt)
        bm25/            the bm25s index of the same texts
        hnsw.faiss       an HNSW graph (faiss), only when built (--approximate)
        index.json       the encoder's folder and settings (pooling, max length), sizes, what was built
        run.json

Dense search is exact by default: one matmul of the query with every vector and a top-k, which is
well under a millisecond on SciFact's 5,183 abstracts (see `APPROXIMATE_ABOVE` in config.py for where that
stops being true and HNSW takes over). Scores are cosine similarities (the vectors are unit length).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmkernel.errors import InputError, optional_import
from llmkernel.retrieval.bm25 import BM25
from llmkernel.retrieval.fusion import RRF_K, Hits, reciprocal_rank_fusion

INDEX_FILE = "index.json"
MODES = ("dense", "bm25", "hybrid")
FUSION_DEPTH = 100  # each ranking's top 100 go into the fusion (recall@100 needs that many)


def is_index_folder(path: str | Path) -> bool:
    return (Path(path) / INDEX_FILE).is_file()


class Index:
    """An index folder loaded for search: vectors (and the HNSW graph if built), BM25, ids and texts."""

    def __init__(self, folder: str | Path, approximate: bool | None = None) -> None:
        folder = Path(folder)
        if not is_index_folder(folder):
            raise InputError(f"{folder}: not an index folder (no {INDEX_FILE}); build one with `llmk index`")
        try:
            self.meta: dict[str, Any] = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
            self.vectors = np.load(folder / "vectors.npy")
            self.ids: list[str] = json.loads((folder / "ids.json").read_text(encoding="utf-8"))
            with open(folder / "documents.jsonl", encoding="utf-8") as handle:
                self.texts = [json.loads(line)["text"] for line in handle]
        except (OSError, ValueError, KeyError) as error:
            raise InputError(
                f"{folder}: a broken index folder ({error}); build it again with `llmk index`"
            ) from None
        if not len(self.ids) == len(self.texts) == self.vectors.shape[0]:
            raise InputError(
                f"{folder}: ids, texts and vectors differ in number; build it again with `llmk index`"
            )
        self.folder = folder
        self.bm25 = BM25.load(folder / "bm25")
        self.hnsw = None
        use_hnsw = self.meta.get("approximate", False) if approximate is None else approximate
        if use_hnsw:
            if not (folder / "hnsw.faiss").is_file():
                raise InputError(
                    f"{folder}: built without an HNSW index; rebuild with `llmk index --approximate true`"
                )
            faiss = optional_import("faiss", "faiss")
            self.hnsw = faiss.read_index(str(folder / "hnsw.faiss"))
            self.hnsw.hnsw.efSearch = int(self.meta.get("hnsw_ef_search", 128))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def encoder(self) -> str:
        """The encoder folder the vectors were made with (queries must be embedded by the same)."""
        return self.meta["encoder"]

    def dense(self, query_vectors: np.ndarray, k: int) -> list[Hits]:
        """The `k` nearest documents of each (unit) query vector, by cosine similarity, best first."""
        query_vectors = np.ascontiguousarray(query_vectors, dtype=np.float32).reshape(
            -1, self.vectors.shape[1]
        )
        k = min(k, len(self.ids))
        if self.hnsw is not None:
            scores, indices = self.hnsw.search(query_vectors, k)
        else:
            # One matrix-vector product per query: numpy's (1, d) x (d, n) matmul takes OpenBLAS's threaded
            # GEMM path, 24 ms against 0.3 ms for SciFact on 2 busy cores.
            scores = np.stack([self.vectors @ query for query in query_vectors])  # (queries, documents)
            indices = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            scores = np.take_along_axis(scores, indices, axis=1)
            order = np.argsort(-scores, axis=1, kind="stable")
            indices, scores = np.take_along_axis(indices, order, 1), np.take_along_axis(scores, order, 1)
        return [
            [(int(i), float(s)) for i, s in zip(row_indices, row_scores) if i >= 0]
            for row_indices, row_scores in zip(indices, scores)
        ]

    def lexical(self, queries: Sequence[str], k: int) -> list[Hits]:
        return self.bm25.search(queries, k)

    def search(
        self,
        queries: Sequence[str],
        query_vectors: np.ndarray | None,
        k: int,
        mode: str = "hybrid",
        rrf_k: int = RRF_K,
    ) -> list[Hits]:
        """The `k` best documents per query: dense (needs the query vectors), bm25, or hybrid (RRF of both,
        each ranking's top max(k, FUSION_DEPTH) fused)."""
        if mode == "bm25":
            return self.lexical(queries, k)
        if mode == "dense":
            return self.dense(query_vectors, k)
        depth = max(k, FUSION_DEPTH)
        dense, lexical = self.dense(query_vectors, depth), self.lexical(queries, depth)
        return [reciprocal_rank_fusion([d, b], rrf_k, top=k) for d, b in zip(dense, lexical)]
