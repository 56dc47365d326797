"""Step 6 of `llmk prepare`: tokenize the clean documents in parallel and write train/val token shards.

The output is what `llmkernel.io.shards.TokenShards` memory-maps for pretraining:

    out_dir/train/shard_00000.bin ...   flat token ids (uint16, or uint32 for vocabularies over 65,536)
    out_dir/val/shard_00000.bin ...
    out_dir/shards.json                 format, dtype, vocab size, separator id and the shard list

Every document is followed by the separator token (eos for decoders, [SEP] for encoders), so splitting a
split's token stream on it gives back the documents. The train/val split is by document, chosen by a
seeded random sample, so it is the same for the same corpus and seed however many workers run.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tokenizers import Tokenizer

from llmkernel.data.config import PackConfig
from llmkernel.io.shards import FORMAT, SHARDS_FILE
from llmkernel.io.tokenizers import document_separator_id, load_tokenizer
from llmkernel.runs import atomic_write_json

SPLITS = ("train", "val")

# Text per work item: large enough that pickling and scheduling are cheap next to tokenizing,
# small enough that a few items in flight per worker stay well under a gigabyte.
DEFAULT_BATCH_BYTES = 2_000_000


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned dtype that holds every id of a `vocab_size` vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def val_indices(num_documents: int, val_fraction: float, seed: int, selection: str = "random") -> set[int]:
    """Indices of the documents held out for validation: round(fraction * n) of them, a seeded random
    sample or (selection "last") the last documents in corpus order, e.g. the end of a single text.

    At least one when val_fraction > 0 and there are two or more documents, and never all of them,
    so both splits have data whenever that is possible.
    """
    count = round(val_fraction * num_documents)
    if val_fraction > 0 and num_documents >= 2:
        count = max(count, 1)
    count = min(count, max(num_documents - 1, 0))
    if selection == "last":
        return set(range(num_documents - count, num_documents))
    return set(random.Random(seed).sample(range(num_documents), count))


def pack_documents(
    documents: Iterable[tuple[str, str]],
    *,
    tokenizer_dir: Path,
    out_dir: Path,
    config: PackConfig,
    num_documents: int,
    seed: int,
    executor: Any,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    total_bytes: int | None = None,
) -> dict[str, Any]:
    """Tokenize `documents` ((doc_id, text) in corpus order, streamed) into shards under `out_dir`.

    With `config.val_selection == "last"` and `total_bytes` (UTF-8 bytes of all documents) given, the
    validation split is the documents that start in the last `val_fraction` of the bytes, e.g. the
    last 10% of one long text split into paragraphs; otherwise it is chosen by document count.
    Returns the shards.json dict (also written to out_dir/shards.json).
    """
    tokenizer = load_tokenizer(tokenizer_dir)
    vocab_size = len(tokenizer)
    separator_id = document_separator_id(tokenizer)
    dtype = token_dtype(vocab_size)
    held_out = val_indices(num_documents, config.val_fraction, seed, config.val_selection)

    def is_val(index: int, text: str) -> bool:
        return index in held_out

    if config.val_selection == "last" and total_bytes and config.val_fraction > 0:
        is_val = _tail_by_bytes(total_bytes * (1 - config.val_fraction))

    writers = {split: _ShardWriter(out_dir, split, dtype, config.shard_tokens) for split in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    batches = _batches(documents, is_val, num_documents, batch_bytes)
    try:
        for train_tokens, val_tokens, n_train, n_val in executor.imap(
            _encode_batch, batches, str(tokenizer_dir), separator_id, dtype
        ):
            writers["train"].write(train_tokens)
            writers["val"].write(val_tokens)
            counts["train"] += n_train
            counts["val"] += n_val
    finally:
        for writer in writers.values():
            writer.close()

    manifest = {
        "format": FORMAT,
        "dtype": dtype,
        "vocab_size": vocab_size,
        "separator_id": separator_id,
        "tokenizer": _tokenizer_reference(Path(tokenizer_dir), Path(out_dir)),
        "seed": seed,
        "splits": {
            split: {
                "documents": counts[split],
                "tokens": writers[split].total,
                "shards": writers[split].shards,
            }
            for split in SPLITS
        },
    }
    atomic_write_json(Path(out_dir) / SHARDS_FILE, manifest)
    return manifest


def _tokenizer_reference(tokenizer_dir: Path, out_dir: Path) -> str:
    """Where shards.json says the tokenizer is: relative when it is inside `out_dir` (which gets renamed)."""
    resolved, out = tokenizer_dir.resolve(), out_dir.resolve()
    return os.path.relpath(resolved, out) if resolved.is_relative_to(out) else str(tokenizer_dir)


def _tail_by_bytes(train_bytes: float):
    """A val test for streamed documents: true for those starting after the first `train_bytes` bytes."""
    seen = [0]

    def is_val(index: int, text: str) -> bool:
        start = seen[0]
        seen[0] += len(text.encode())
        return index > 0 and start >= train_bytes

    return is_val


def _batches(
    documents: Iterable[tuple[str, str]], is_val, num_documents: int, batch_bytes: int
) -> Iterator[tuple[list[str], list[bool]]]:
    """Consecutive documents grouped into work items of about `batch_bytes` characters, with val flags."""
    texts: list[str] = []
    flags: list[bool] = []
    size = 0
    index = -1
    for index, (_doc_id, text) in enumerate(documents):
        if index >= num_documents:
            raise ValueError(f"pack_documents got more documents than num_documents={num_documents}")
        texts.append(text)
        flags.append(is_val(index, text))
        size += len(text)
        if size >= batch_bytes:
            yield texts, flags
            texts, flags, size = [], [], 0
    if texts:
        yield texts, flags
    if index + 1 != num_documents:
        raise ValueError(f"pack_documents got {index + 1} documents, expected num_documents={num_documents}")


# Long documents are encoded in pieces of about this many characters, at most ENCODE_GROUP_CHARS per call:
# the Rust tokenizer keeps ~400 bytes per token while encoding, so a 100 MB document in one call would
# need ~12 GB. Small pieces are also ~15% faster (cache-friendly) and give its thread pool work to share.
ENCODE_PIECE_CHARS = 10_000
ENCODE_GROUP_CHARS = 1_000_000

# A cut after a newline that has non-space characters on both sides ("end.\nNext") changes no token for
# whitespace-splitting pre-tokenizers: the newline is a token of its own and the next word starts a new one.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")
_SAFE_PRE_TOKENIZERS = ("BertPreTokenizer", "Whitespace", "WhitespaceSplit")
_SAFE_NORMALIZERS = (None, "BertNormalizer", "NFC", "NFD", "NFKC", "NFKD", "Lowercase")

# One tokenizer per worker process and folder: loading it for every batch would cost more than encoding.
_TOKENIZERS: dict[str, tuple[Tokenizer, bool]] = {}


def _load_backend(tokenizer_dir: str) -> tuple[Tokenizer, bool]:
    """The Rust tokenizer in `tokenizer_dir`, and whether long documents may be cut into pieces."""
    if tokenizer_dir not in _TOKENIZERS:
        spec = (Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8")
        tokenizer = Tokenizer.from_str(spec)
        # Reused tokenizers (BERT's) may carry truncation/padding from their model; documents need all tokens.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        _TOKENIZERS[tokenizer_dir] = (tokenizer, _cuts_are_exact(json.loads(spec)))
    return _TOKENIZERS[tokenizer_dir]


def _cuts_are_exact(spec: dict[str, Any]) -> bool:
    """Whether encoding pieces cut at _SAFE_CUT gives the same ids as encoding the whole text.

    True for the byte-level BPE and WordPiece tokenizers trained here; others (e.g. SentencePiece-style
    Metaspace, which marks the start of every input) get whole documents.
    """
    pre = spec.get("pre_tokenizer") or {}
    normalizer = (spec.get("normalizer") or {}).get("type")
    if pre.get("type") == "ByteLevel":
        safe_pre = pre.get("use_regex", True) and not pre.get("add_prefix_space", False)
    else:
        safe_pre = pre.get("type") in _SAFE_PRE_TOKENIZERS
    return bool(safe_pre) and normalizer in _SAFE_NORMALIZERS


def _pieces(text: str, size: int) -> Iterator[str]:
    """`text` cut at safe newlines into pieces of at least `size` characters (whole when it has none)."""
    start = 0
    while len(text) - start > 2 * size:
        cut = _SAFE_CUT.search(text, start + size)
        if cut is None:
            break
        yield text[start : cut.start()]
        start = cut.start()
    yield text[start:]


def _encode_batch(
    batch: tuple[list[str], list[bool]], tokenizer_dir: str, separator_id: int, dtype: str
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Tokenize one work item: (train tokens, val tokens, train documents, val documents).

    Each document's tokens are followed by the separator; the two arrays keep corpus order.
    """
    texts, flags = batch
    tokenizer, cut = _load_backend(tokenizer_dir)
    separator = np.array([separator_id], dtype=dtype)
    parts: dict[bool, list[np.ndarray]] = {False: [], True: []}
    group: list[tuple[str, bool, bool]] = []  # (piece, is_val, is the document's last piece)

    def encode_group() -> None:
        encodings = tokenizer.encode_batch_fast([piece for piece, _, _ in group], add_special_tokens=False)
        for encoding, (_, is_val, last) in zip(encodings, group):
            parts[is_val].append(np.array(encoding.ids, dtype=dtype))
            if last:
                parts[is_val].append(separator)
        group.clear()

    group_chars = 0
    for text, is_val in zip(texts, flags):
        pieces = list(_pieces(text, ENCODE_PIECE_CHARS)) if cut else [text]
        for i, piece in enumerate(pieces):
            group.append((piece, is_val, i == len(pieces) - 1))
            group_chars += len(piece)
            if group_chars >= ENCODE_GROUP_CHARS:
                encode_group()
                group_chars = 0
    if group:
        encode_group()
    empty = np.empty(0, dtype=dtype)
    train = np.concatenate(parts[False]) if parts[False] else empty
    val = np.concatenate(parts[True]) if parts[True] else empty
    return train, val, flags.count(False), flags.count(True)


class _ShardWriter:
    """Appends tokens to out_dir/split/shard_NNNNN.bin files of at most `shard_tokens` tokens each."""

    def __init__(self, out_dir: Path, split: str, dtype: str, shard_tokens: int) -> None:
        self.out_dir = Path(out_dir)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.total = 0
        self._file: BinaryIO | None = None
        self._in_shard = 0
        (self.out_dir / split).mkdir(parents=True, exist_ok=True)

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        while len(tokens):
            if self._file is None or self._in_shard == self.shard_tokens:
                self._next_shard()
            take = min(len(tokens), self.shard_tokens - self._in_shard)
            assert self._file is not None
            self._file.write(memoryview(tokens[:take]))
            self._in_shard += take
            self.total += take
            tokens = tokens[take:]

    def _next_shard(self) -> None:
        self._finish_shard()
        name = f"{self.split}/shard_{len(self.shards):05d}.bin"
        self._file = open(self.out_dir / name, "wb")  # closed by _finish_shard
        self.shards.append({"file": name, "tokens": 0})
        self._in_shard = 0

    def _finish_shard(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())  # the caller renames the folder into place; the data must be on disk
        self._file.close()
        self._file = None
        self.shards[-1]["tokens"] = self._in_shard

    def close(self) -> None:
        self._finish_shard()
