"""`llmk prepare`: read -> clean -> filter -> dedup -> PII -> tokenizer -> pack, streaming, into one run folder.

Three passes over the data, each bounded in memory:
1. Read the inputs in batches of about `batch_bytes`; workers (a process pool or Ray tasks) clean, filter,
   mask PII and compute dedup keys and MinHash signatures; this process makes the corpus-wide dedup
   decisions in input order and writes kept documents to clean/ and dropped ones, with the reason, to
   excluded/.
2. Train the tokenizer on clean/ (a seeded sample when it is larger than `tokenizer.max_train_bytes`).
3. Tokenize clean/ in parallel and write train/ and val/ token shards with shards.json.

Everything is written into a staging folder that replaces `--out` only when complete.
"""

from __future__ import annotations

import gzip
import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from llmkernel.config import to_dict
from llmkernel.data.clean import Cleaner
from llmkernel.data.config import CleanConfig, DedupConfig, FilterConfig, PiiConfig, PrepareConfig
from llmkernel.data.dedup import Deduplicator, MinHasher, exact_key
from llmkernel.data.executor import make_executor
from llmkernel.data.filters import QualityFilter
from llmkernel.data.pack import pack_documents
from llmkernel.data.readers import Document, builtin_fingerprint, read_documents, resolve_inputs
from llmkernel.data.report import PrepareStats, summary
from llmkernel.data.tokenizer import reuse_tokenizer, train_tokenizer
from llmkernel.errors import InputError
from llmkernel.io.files import iter_parts
from llmkernel.pii import PiiDetector
from llmkernel.runs import (
    Manifest,
    describe_inputs,
    fingerprint,
    is_up_to_date,
    read_manifest,
    staging_folder,
)

STAGE = "prepare"
PART_BYTES = 256_000_000  # uncompressed text per clean/ or excluded/ part file
RUN_ONLY_FIELDS = (
    "out",
    "force",
    "progress",
    "workers",
    "executor",
    "ray_address",
)  # do not change the result

# --------------------------------------------------------------------------- worker side (per batch)


@dataclass
class Processed:
    """One document after the per-document steps; the driver decides dedup and where it goes."""

    id: str
    source: str
    text: str
    reason: str | None
    language: str
    key: bytes | None = None
    signature: np.ndarray | None = None
    pii: Counter = field(default_factory=Counter)
    changed: list[str] = field(default_factory=list)


@dataclass
class BatchResult:
    documents: list[Processed]
    seconds: Counter  # step -> CPU seconds in this worker
    bytes_in: Counter  # step -> bytes that entered it


@dataclass(frozen=True)
class StepConfigs:
    clean: CleanConfig
    filter: FilterConfig
    dedup: DedupConfig
    pii: PiiConfig


class DocumentProcessor:
    """Clean, filter, PII-mask and fingerprint documents: the part of prepare that runs in parallel."""

    def __init__(self, steps: StepConfigs) -> None:
        self.cleaner = Cleaner(steps.clean)
        self.filter = QualityFilter(steps.filter)
        self.exact = steps.dedup.exact
        self.hasher = (
            MinHasher(steps.dedup.num_perm, steps.dedup.shingle_size, steps.dedup.seed)
            if steps.dedup.near
            else None
        )
        self.pii = PiiDetector(steps.pii.types) if steps.pii.enabled else None

    def __call__(self, documents: list[Document]) -> BatchResult:
        seconds: Counter = Counter()
        bytes_in: Counter = Counter()
        out = []
        for doc in documents:
            size = len(doc.text.encode())
            clock = time.perf_counter()
            text, changed = self.cleaner(doc.text, doc.html)
            now = time.perf_counter()
            seconds["clean"] += now - clock
            bytes_in["clean"] += size
            size = len(text.encode())
            clock = now
            reason, language, _score = self.filter(text)
            now = time.perf_counter()
            seconds["filter"] += now - clock
            bytes_in["filter"] += size
            processed = Processed(doc.id, doc.source, text, reason, language, changed=changed)
            if reason is None:
                clock = now
                processed.key = exact_key(text) if self.exact else None
                processed.signature = self.hasher.signature(text) if self.hasher else None
                now = time.perf_counter()
                seconds["dedup"] += now - clock
                bytes_in["dedup"] += size
            if self.pii is not None:  # masked in excluded/ too, so no output file holds raw PII
                clock = now
                processed.text, processed.pii = self.pii.mask(text)
                seconds["pii"] += time.perf_counter() - clock
                bytes_in["pii"] += size
            out.append(processed)
        return BatchResult(out, seconds, bytes_in)


_PROCESSOR: tuple[StepConfigs, DocumentProcessor] | None = None


def process_batch(documents: list[Document], steps: StepConfigs) -> BatchResult:
    """Worker entry point: builds the processor once per process (language model, regexes) and reuses it."""
    global _PROCESSOR
    if _PROCESSOR is None or _PROCESSOR[0] != steps:
        _PROCESSOR = (steps, DocumentProcessor(steps))
    return _PROCESSOR[1](documents)


# -------------------------------------------------------------------------------- jsonl.gz parts


class PartWriter:
    """Writes records to folder/part-00000.jsonl.gz, starting a new part every PART_BYTES of JSON."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.part = -1
        self.handle = None
        self.written = PART_BYTES

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if self.written >= PART_BYTES:
            self._next()
        self.handle.write(line)
        self.written += len(line)

    def _next(self) -> None:
        self.close()
        self.part += 1
        self.handle = gzip.open(
            self.folder / f"part-{self.part:05d}.jsonl.gz", "wt", encoding="utf-8", compresslevel=3
        )
        self.written = 0

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


# ---------------------------------------------------------------------------------------- driver


def _batches(config: PrepareConfig, files, stats: PrepareStats, progress: tqdm) -> Iterator[list[Document]]:
    batch: list[Document] = []
    size = 0
    for spec, path in files:
        for doc in read_documents(spec, path, stats.read, config.strict):
            batch.append(doc)
            nbytes = len(doc.text.encode())
            size += nbytes
            progress.update(nbytes)
            if size >= config.batch_bytes:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _clean_pass(
    config: PrepareConfig, files, stage: Path, stats: PrepareStats, executor, total_bytes: int | None
) -> None:
    """Pass 1: per-document steps in the workers, dedup decisions and writing here."""
    steps = StepConfigs(config.clean, config.filter, config.dedup, config.pii)
    dedup = Deduplicator(config.dedup) if (config.dedup.exact or config.dedup.near) else None
    kept, excluded = PartWriter(stage / "clean"), PartWriter(stage / "excluded")
    progress = tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        desc="clean/filter/dedup/pii",
        disable=not config.progress,
    )
    try:
        for result in executor.imap(process_batch, _batches(config, files, stats, progress), steps):
            for name, seconds in result.seconds.items():
                stats.steps[name].seconds += seconds
            for name, nbytes in result.bytes_in.items():
                stats.steps[name].bytes_in += nbytes
            for where, why in stats.read.unreported:
                excluded.write(
                    {"id": where, "source": where.rsplit(":", 1)[0], "reason": "malformed", "detail": why}
                )
            stats.read.unreported.clear()
            for doc in result.documents:
                _route(doc, dedup, stats, kept, excluded)
    finally:
        progress.close()
        kept.close()
        excluded.close()
    if dedup is not None:
        stats.duplicate_clusters = dedup.clusters


def _route(
    doc: Processed, dedup: Deduplicator | None, stats: PrepareStats, kept: PartWriter, excluded: PartWriter
) -> None:
    """Count a processed document through the steps and write it to clean/ or excluded/."""
    steps = stats.steps
    size = len(doc.text.encode())
    steps["clean"].documents_in += 1
    steps["clean"].documents_out += 1
    steps["clean"].bytes_out += size
    stats.changed.update(doc.changed)
    steps["filter"].documents_in += 1
    reason, duplicate_of = doc.reason, None
    if reason is None:
        steps["filter"].documents_out += 1
        steps["filter"].bytes_out += size
        steps["dedup"].documents_in += 1
        if dedup is not None:
            clock = time.perf_counter()
            reason, duplicate_of = dedup.add(doc.id, doc.key, doc.signature)
            steps["dedup"].seconds += time.perf_counter() - clock
    if reason is not None:
        stats.dropped[reason] += 1
        record = {
            "id": doc.id,
            "source": doc.source,
            "reason": reason,
            "language": doc.language,
            "text": doc.text,
        }
        if duplicate_of:
            record["duplicate_of"] = duplicate_of
        excluded.write(record)
        return
    steps["dedup"].documents_out += 1
    steps["dedup"].bytes_out += size
    steps["pii"].documents_in += 1
    steps["pii"].documents_out += 1
    steps["pii"].bytes_out += size
    stats.pii.update(doc.pii)
    stats.documents_with_pii += bool(doc.pii)
    stats.languages[doc.language] += 1
    kept.write({"id": doc.id, "source": doc.source, "text": doc.text})


def _tokenizer_texts(
    clean: Path, stats: PrepareStats, max_bytes: int, seed: int, progress: tqdm
) -> Iterator[str]:
    """The clean texts the tokenizer trains on: all of them, or a seeded sample of about `max_bytes`."""
    keep = min(1.0, max_bytes / max(1, stats.steps["pii"].bytes_out))
    rng = random.Random(seed)
    tokenizer_step = stats.steps["tokenizer"]
    for record in iter_parts(clean):
        if keep < 1.0 and rng.random() >= keep:
            continue
        size = len(record["text"].encode())
        tokenizer_step.documents_in += 1
        tokenizer_step.bytes_in += size
        progress.update(size)
        yield record["text"]


def prepare(config: PrepareConfig) -> dict[str, Any]:
    """Run `llmk prepare` and return stats.json's content (printing the summary table)."""
    started = time.time()
    files = resolve_inputs(config.inputs)
    out = Path(config.out)
    resolved = to_dict(config)
    inputs = [builtin_fingerprint() if path is None else describe_inputs([path])[0] for _, path in files]
    run_fingerprint = fingerprint(resolved, inputs, RUN_ONLY_FIELDS)
    if not config.force and is_up_to_date(out, STAGE, run_fingerprint):
        print(f"{out} is up to date (same config and inputs); nothing to do. Use --force to run again.")
        return read_manifest(out)["metrics"]
    total_bytes = (
        None
        if any(p is None or p.suffix in (".gz", ".zst") for _, p in files)
        else sum(i["bytes"] for i in inputs)
    )

    stats = PrepareStats()
    manifest = Manifest(
        stage=STAGE, config=resolved, inputs=inputs, fingerprint=run_fingerprint, started_at=started
    )
    with staging_folder(out) as stage:
        executor = make_executor(config.executor, config.workers, config.ray_address)
        try:
            _clean_pass(config, files, stage, stats, executor, total_bytes)
            stats.steps["read"] = _read_step(stats)
            if stats.read.documents == 0:
                raise InputError(
                    f"no documents in the inputs ({', '.join(str(s.path) for s in config.inputs)}): "
                    "the files are empty or every record was malformed"
                )
            if stats.steps["pii"].documents_out == 0:
                raise InputError(
                    "every document was dropped ("
                    + ", ".join(f"{k}: {v}" for k, v in stats.dropped.items())
                    + "); loosen the filter settings, e.g. --filter.min_chars, --filter.languages"
                )
            _tokenizer_step(config, stage, stats)
            if config.pack.enabled:
                _pack_step(config, stage, stats, executor)
        finally:
            executor.close()
        stats.wall_seconds = time.time() - started
        metrics = stats.to_dict()
        (stage / "stats.json").write_text(
            json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        manifest.metrics = metrics
        manifest.write(stage)
    print(summary(metrics, str(out)))
    return metrics


def _read_step(stats: PrepareStats):
    step = stats.steps["read"]
    step.documents_in = step.documents_out = stats.read.documents
    step.bytes_in = stats.read.bytes
    step.bytes_out = stats.steps["clean"].bytes_in
    return step


def _tokenizer_step(config: PrepareConfig, stage: Path, stats: PrepareStats) -> None:
    clock = time.perf_counter()
    if config.tokenizer.from_model:
        tokenizer = reuse_tokenizer(config.tokenizer.from_model, stage / "tokenizer")
    else:
        total = min(config.tokenizer.max_train_bytes, stats.steps["pii"].bytes_out)
        progress = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizer", disable=not config.progress)
        texts = _tokenizer_texts(
            stage / "clean", stats, config.tokenizer.max_train_bytes, config.seed, progress
        )
        try:
            tokenizer = train_tokenizer(texts, config.tokenizer, stage / "tokenizer")
        finally:
            progress.close()
    step = stats.steps["tokenizer"]
    step.seconds = time.perf_counter() - clock
    step.documents_out = step.documents_in
    stats.vocab_size = len(tokenizer)


def _pack_step(config: PrepareConfig, stage: Path, stats: PrepareStats, executor) -> None:
    clock = time.perf_counter()
    kept = stats.steps["pii"]
    step = stats.steps["pack"]
    progress = tqdm(total=kept.documents_out, unit="doc", desc="pack", disable=not config.progress)

    def documents() -> Iterator[tuple[str, str]]:
        for record in iter_parts(stage / "clean"):
            progress.update(1)
            step.documents_in += 1
            step.bytes_in += len(record["text"].encode())
            yield record["id"], record["text"]

    try:
        shards = pack_documents(
            documents(),
            tokenizer_dir=stage / "tokenizer",
            out_dir=stage,
            config=config.pack,
            num_documents=kept.documents_out,
            seed=config.seed,
            executor=executor,
            batch_bytes=config.batch_bytes,
            total_bytes=kept.bytes_out,
        )
    finally:
        progress.close()
    step.seconds = time.perf_counter() - clock
    splits = shards["splits"]
    stats.tokens = {name: split["tokens"] for name, split in splits.items()}
    stats.documents_split = {name: split["documents"] for name, split in splits.items()}
    step.documents_out = sum(stats.documents_split.values())
    step.bytes_out = sum(
        (stage / s["file"]).stat().st_size for split in splits.values() for s in split["shards"]
    )
