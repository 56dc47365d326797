"""`llmk index`: embedding indexes (exact, or HNSW from faiss), BM25 (bm25s) and hybrid ranking (RRF)."""
