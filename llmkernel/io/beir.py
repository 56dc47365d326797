"""Retrieval sets: BEIR folders (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv) and plain pair files.

A BEIR folder (Thakur et al. 2021; the layout `beir.datasets.data_loader.GenericDataLoader` reads):

  corpus.jsonl    {"_id", "title", "text", ...} one document per line
  queries.jsonl   {"_id", "text", ...} one query per line
  qrels/SPLIT.tsv query-id <TAB> corpus-id <TAB> score, with a header line (score > 0: relevant)

A document's text is `title + " " + text` (how BEIR and MTEB embed it). A pair file is jsonl with `query`
and `positive` (optionally `negative`) texts per line, for training from pairs without a corpus.
Every problem (a missing file, a malformed line, an id the qrels name that the corpus or the queries lack)
is an InputError naming the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkernel.errors import InputError

CORPUS, QUERIES, QRELS = "corpus.jsonl", "queries.jsonl", "qrels"


@dataclass
class RetrievalSet:
    """A corpus, the queries of one split and their relevance judgements."""

    corpus: dict[str, str]  # document id -> "title text"
    queries: dict[str, str]  # query id -> text (only the queries the split judges)
    qrels: dict[str, dict[str, int]]  # query id -> {document id: relevance > 0}
    folder: Path | None = None
    split: str = ""


@dataclass
class Pair:
    """One training pair: a query, a relevant text and optionally a non-relevant one (a hard negative)."""

    query: str
    positive: str
    negatives: list[str] = field(default_factory=list)


def is_beir_folder(path: str | Path) -> bool:
    """A folder holding a BEIR corpus.jsonl (what `llmk evaluate` and `llmk finetune embed` tell apart)."""
    return Path(path).is_dir() and (Path(path) / CORPUS).is_file()


def _json_lines(path: Path):
    """(line number, object) for every non-blank line of a jsonl file."""
    if not path.is_file():
        raise InputError(f"{path}: no such file; a BEIR folder holds {CORPUS}, {QUERIES} and {QRELS}/*.tsv")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(
                    f"{path}:{number}: not valid JSON ({error.msg}); fix or remove the line"
                ) from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{number}: expected a JSON object per line")
            yield number, row


def _field(row: dict[str, Any], name: str, path: Path, number: int) -> str:
    value = row.get(name)
    if not isinstance(value, str | int) or (isinstance(value, str) and not value.strip() and name != "title"):
        raise InputError(f'{path}:{number}: "{name}" is missing or not a string; every line needs one')
    return str(value)


def read_corpus(path: str | Path) -> dict[str, str]:
    """Document id -> "title text" from a BEIR corpus.jsonl (or the folder holding one)."""
    path = Path(path)
    path = path / CORPUS if path.is_dir() else path
    corpus: dict[str, str] = {}
    for number, row in _json_lines(path):
        doc_id = _field(row, "_id", path, number)
        title = row.get("title") or ""
        text = row.get("text")
        if not isinstance(text, str) or not isinstance(title, str):
            raise InputError(f'{path}:{number}: "text" (and "title") must be strings')
        corpus[doc_id] = f"{title} {text}".strip() if title else text.strip()
    if not corpus:
        raise InputError(f"{path}: no documents")
    return corpus


def read_queries(path: str | Path) -> dict[str, str]:
    """Query id -> text from a BEIR queries.jsonl."""
    path = Path(path)
    return {_field(row, "_id", path, n): _field(row, "text", path, n) for n, row in _json_lines(path)}


def qrels_splits(folder: str | Path) -> list[str]:
    """The splits a BEIR folder has judgements for (the names of qrels/*.tsv)."""
    return sorted(p.stem for p in (Path(folder) / QRELS).glob("*.tsv"))


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """query id -> {document id: score} of the relevant (score > 0) pairs of a BEIR qrels tsv."""
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            parts = line.rstrip("\r\n").split("\t")
            if number == 1 and parts[0] in ("query-id", "query_id", "qid"):
                continue  # the header
            if not line.strip():
                continue
            if len(parts) != 3:
                raise InputError(
                    f"{path}:{number}: expected 3 tab-separated columns (query-id, corpus-id, score), got {len(parts)}"
                )
            try:
                score = int(float(parts[2]))
            except ValueError:
                raise InputError(f"{path}:{number}: score {parts[2]!r} is not a number") from None
            if score > 0:
                qrels.setdefault(parts[0], {})[parts[1]] = score
    if not qrels:
        raise InputError(f"{path}: no relevant (score > 0) query-document pairs")
    return qrels


def read_beir(folder: str | Path, split: str, corpus: dict[str, str] | None = None) -> RetrievalSet:
    """The corpus, the queries judged in `split` and their qrels; InputError for ids the qrels name that
    the corpus or queries.jsonl lack (a broken folder would otherwise score silently lower)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder; pass a BEIR folder ({CORPUS}, {QUERIES}, {QRELS}/)")
    qrels_file = folder / QRELS / f"{split}.tsv"
    if not qrels_file.is_file():
        have = ", ".join(qrels_splits(folder)) or "none"
        raise InputError(f"{qrels_file}: no such file; the splits of {folder} are: {have} (--split)")
    corpus = read_corpus(folder) if corpus is None else corpus
    queries = read_queries(folder / QUERIES)
    qrels = read_qrels(qrels_file)
    for query_id, documents in qrels.items():
        if query_id not in queries:
            raise InputError(f"{qrels_file}: query id {query_id!r} is not in {folder / QUERIES}")
        missing = next((d for d in documents if d not in corpus), None)
        if missing is not None:
            raise InputError(
                f"{qrels_file}: corpus id {missing!r} (query {query_id!r}) is not in {folder / CORPUS}"
            )
    judged = {query_id: queries[query_id] for query_id in qrels}
    return RetrievalSet(corpus, judged, qrels, folder, split)


def read_pairs(path: str | Path) -> list[Pair]:
    """Training pairs from jsonl: `query` and `positive` texts, optional `negative` (a text or a list)."""
    path = Path(path)
    pairs = []
    for number, row in _json_lines(path):
        negatives = row.get("negative") or row.get("negatives") or []
        negatives = [negatives] if isinstance(negatives, str) else negatives
        if not isinstance(negatives, list) or not all(isinstance(n, str) for n in negatives):
            raise InputError(f'{path}:{number}: "negative" must be a text or a list of texts')
        pairs.append(
            Pair(_field(row, "query", path, number), _field(row, "positive", path, number), negatives)
        )
    if not pairs:
        raise InputError(f"{path}: no pairs; each line needs a query and a positive text")
    return pairs
