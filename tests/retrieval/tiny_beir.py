"""A tiny BEIR folder for the retrieval tests: 24 documents about six topics, a query per document.

Each document names its topic word three times among filler words; each query names the topic and a
word only its document holds, so BM25 ranks the right document first and a trained encoder can learn it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = ["paris", "berlin", "alice", "bob", "hello", "world"]
FILLER = ["the", "in", "me", "call", "lives", "works"]
MARKERS = [f"{a}{b}{c}" for a in "kmqz" for b in "aeiou" for c in "xyv"]  # unique per document


def make_tiny_beir(folder: Path, documents: int = 24, seed: int = 0) -> Path:
    """corpus.jsonl, queries.jsonl and qrels/{train,test}.tsv: every fourth query is a test query."""
    rng = random.Random(seed)
    (folder / "qrels").mkdir(parents=True)
    corpus, queries, train, test = [], [], [], []
    for index in range(documents):
        topic, marker = TOPICS[index % len(TOPICS)], MARKERS[index]
        words = [topic] * 3 + [marker] + rng.choices(FILLER, k=6)
        rng.shuffle(words)
        corpus.append({"_id": f"d{index}", "title": topic, "text": " ".join(words), "metadata": {}})
        queries.append({"_id": f"q{index}", "text": f"{topic} {marker}", "metadata": {}})
        (test if index % 4 == 3 else train).append(f"q{index}\td{index}\t1")
    (folder / "corpus.jsonl").write_text("".join(json.dumps(row) + "\n" for row in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(row) + "\n" for row in queries))
    header = "query-id\tcorpus-id\tscore\n"
    (folder / "qrels" / "train.tsv").write_text(header + "\n".join(train) + "\n")
    (folder / "qrels" / "test.tsv").write_text(header + "\n".join(test) + "\n")
    return folder
