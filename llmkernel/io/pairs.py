"""Sentence pairs for translation: a source and a target column of a table (tsv, csv, jsonl, parquet).

`seq2seq` trains on them as they are; `sft` turns each pair into a two-turn conversation (the source, put
into a prompt template, as the user turn; the target as the reply), so both approaches read the same file
(e.g. ../shared/data/tatoeba_zh_en/train.tsv: header `src<TAB>tgt`, Chinese source, English target).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmkernel.errors import InputError
from llmkernel.io.files import split_compression
from llmkernel.io.tables import TABLE_FORMATS, read_rows

SOURCE_COLUMNS = ("src", "source", "input", "prompt")
TARGET_COLUMNS = ("tgt", "target", "output", "reference", "response")
SOURCE_PLACEHOLDER = "{source}"


@dataclass
class Pairs:
    """Parallel sentences: `sources[i]` translates to `targets[i]`."""

    sources: list[str]
    targets: list[str]
    source_column: str
    target_column: str
    path: str

    def __len__(self) -> int:
        return len(self.sources)


def is_table(path: str | Path) -> bool:
    """Whether `path` is a table file (by extension, compression allowed): the files pairs come from."""
    return split_compression(Path(path))[0] in TABLE_FORMATS


def read_pairs(
    path: str | Path, source_column: str | None = None, target_column: str | None = None, limit: int = 0
) -> Pairs:
    """The (source, target) rows of a table; columns left as None are detected (src/source/..., tgt/target/...).

    Raises:
        InputError: for a missing column, a row without a target (a tsv line without a tab), or an empty
            source or target, each named by file, row and line.
    """
    table = read_rows(Path(path))
    columns = ", ".join(table.columns)
    source = _pick(table.columns, source_column, SOURCE_COLUMNS, "source", table.path, columns)
    target = _pick(table.columns, target_column, TARGET_COLUMNS, "target", table.path, columns)
    count = min(limit, len(table.rows)) if limit > 0 else len(table.rows)
    sources, targets = [], []
    for index in range(count):
        row = table.rows[index]
        for column, into in ((source, sources), (target, targets)):
            value = row.get(column)
            if not isinstance(value, str) or not value.strip():
                what = "empty" if value is None or isinstance(value, str) else f"a {type(value).__name__} in"
                raise InputError(
                    f"{table.where(index)}: {what} {column!r}; every row needs a source and a target "
                    "sentence (fill it in or remove the row)"
                )
            into.append(value.strip())
    return Pairs(sources, targets, source, target, str(path))


def _pick(
    available: Sequence[str], name: str | None, candidates: Sequence[str], kind: str, path, columns: str
) -> str:
    flag = f"--data.{kind}_column"
    if name is not None:
        if name not in available:
            raise InputError(f"{path}: no {kind} column '{name}'; columns are: {columns} (set {flag})")
        return name
    found = next((c for c in candidates if c in available), None)
    if found is None:
        raise InputError(
            f"{path}: no {kind} column found (looked for {', '.join(candidates)}); columns are: {columns} "
            f"(set {flag})"
        )
    return found


def as_conversations(pairs: Pairs, template: str) -> list[list[dict[str, str]]]:
    """Each pair as [user: template with {source} filled in, assistant: target] (what `sft` trains on)."""
    if SOURCE_PLACEHOLDER not in template:
        raise InputError(
            f"--data.prompt_template {template!r} has no {SOURCE_PLACEHOLDER}; put {SOURCE_PLACEHOLDER} "
            "where the source sentence goes"
        )
    return [
        [
            {"role": "user", "content": template.replace(SOURCE_PLACEHOLDER, source)},
            {"role": "assistant", "content": target},
        ]
        for source, target in zip(pairs.sources, pairs.targets)
    ]


UNKNOWN_RATE_LIMIT = (
    0.2  # above this share of unknown or byte-fallback tokens the tokenizer lacks the language
)
_REPLACEMENT = "\ufffd"  # what a lone byte of a multi-byte character decodes to


def unknown_rate(tokenizer, texts: Sequence[str]) -> float:
    """Share of the tokens of `texts` that are the unknown token or a byte fallback.

    A byte fallback is a token that stands for part of a character (it decodes on its own to U+FFFD): a
    byte-level BPE or SentencePiece with byte fallback writes every character it never merged as 2-4 of
    them. A tokenizer trained on English only does this for ~100% of Chinese tokens; one trained on both
    languages for under 1% (the rarest characters).
    """
    unknown_id = tokenizer.unk_token_id
    decoded: dict[int, bool] = {}  # token id -> whether it is unknown or a byte fallback
    bad = total = 0
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        for token_id in ids:
            if token_id not in decoded:
                decoded[token_id] = token_id == unknown_id or _REPLACEMENT in tokenizer.decode([token_id])
            bad += decoded[token_id]
        total += len(ids)
    return bad / max(1, total)


def check_tokenizer_covers(tokenizer, texts: Sequence[str], what: str) -> float:
    """The unknown/byte-fallback rate of `texts`; InputError above UNKNOWN_RATE_LIMIT (an unknown language)."""
    rate = unknown_rate(tokenizer, texts)
    if rate > UNKNOWN_RATE_LIMIT:
        raise InputError(
            f"{what}: {100 * rate:.0f}% of the tokens are unknown or byte fallbacks (limit "
            f"{100 * UNKNOWN_RATE_LIMIT:.0f}%): the tokenizer was not trained on this language; train one on "
            "both languages with `llmk prepare` (see recipes/tatoeba-translation.yaml) and pass --tokenizer"
        )
    return rate
