"""Hybrid ranking: reciprocal-rank fusion of several rankings of the same corpus.

RRF (Cormack, Clarke and Buettcher 2009, "Reciprocal Rank Fusion outperforms Condorcet and individual Rank
Learning Methods"): a document's fused score is the sum over rankings of 1 / (k + rank), rank counted from
1, with k = 60 as in the paper. It needs no score calibration between rankers (cosine similarities and BM25
scores live on different scales), which is why it is the usual way to combine dense and lexical search.
"""

from __future__ import annotations

from collections.abc import Sequence

RRF_K = 60  # Cormack et al.'s constant

Hits = list[tuple[int, float]]  # (document index, score), best first


def reciprocal_rank_fusion(rankings: Sequence[Hits], k: int = RRF_K, top: int = 10) -> Hits:
    """The `top` documents by fused score 1 / (k + rank) summed over `rankings` (each best first)."""
    fused: dict[int, float] = {}
    for hits in rankings:
        for rank, (document, _) in enumerate(hits, 1):
            fused[document] = fused.get(document, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))[:top]
