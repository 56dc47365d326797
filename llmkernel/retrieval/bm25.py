"""Lexical search: Okapi BM25 from `bm25s` (Lu 2024, sparse-matrix BM25, scores as Lucene computes them).

Texts are lower-cased, split into words, English stop words dropped and the words stemmed with Snowball's
English stemmer (PyStemmer), close to the Elasticsearch English analyzer behind BEIR's BM25 figures.
k1 = 1.2 and b = 0.75 are Lucene's (and Elasticsearch's) defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llmkernel.retrieval.fusion import Hits

K1, B = 1.2, 0.75


def _stemmer():
    import Stemmer  # PyStemmer

    return Stemmer.Stemmer("english")


def _tokenize(texts: Sequence[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(
        list(texts), stopwords="en", stemmer=_stemmer(), return_ids=False, show_progress=False
    )


class BM25:
    """A BM25 index of a corpus (documents by their position), built once and saved beside the vectors."""

    def __init__(self, retriever) -> None:
        self.retriever = retriever

    @classmethod
    def build(cls, texts: Sequence[str], k1: float = K1, b: float = B) -> BM25:
        import bm25s

        retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
        retriever.index(_tokenize(texts), show_progress=False)
        return cls(retriever)

    def save(self, folder: str | Path) -> None:
        self.retriever.save(str(folder))

    @classmethod
    def load(cls, folder: str | Path) -> BM25:
        import bm25s

        return cls(bm25s.BM25.load(str(folder)))

    def search(self, queries: Sequence[str], k: int) -> list[Hits]:
        """The `k` best documents per query by BM25 score (fewer when fewer documents share a word)."""
        tokens = _tokenize(queries)
        known = self.retriever.vocab_dict
        results: list[Hits] = [[] for _ in queries]
        asked = [i for i, words in enumerate(tokens) if any(w in known for w in words)]
        if not asked:
            return results
        k = min(k, self.retriever.scores["num_docs"])
        documents, scores = self.retriever.retrieve(
            [[w for w in tokens[i] if w in known] for i in asked], k=k, show_progress=False, n_threads=1
        )
        for row, i in enumerate(asked):
            keep = np.asarray(scores[row]) > 0  # documents sharing no word with the query are no match
            results[i] = [(int(d), float(s)) for d, s in zip(documents[row][keep], scores[row][keep])]
        return results
