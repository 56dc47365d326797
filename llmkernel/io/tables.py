"""Labeled tables for `llmk finetune` and `llmk evaluate`: csv, tsv, jsonl, json and parquet rows, and
classification examples (text, optional pair, label) read from them.

Unlike the pretraining readers (`llmkernel.data.readers`), which count and skip bad records in a stream of
raw text, these files are small and every row is a training example: anything malformed is an InputError
that names the file, the line and the fix. Files are read whole; the extension picks the format
(optionally .gz or .zst compressed).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkernel.errors import InputError
from llmkernel.io.files import numbered_lines, read_text, split_compression

TABLE_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
}
TEXT_COLUMNS = ("text", "sentence", "sentence1", "content", "review", "question", "document", "input")
PAIR_COLUMNS = ("text_pair", "sentence2", "question2", "hypothesis")
LABEL_COLUMNS = ("label", "labels", "class", "category", "target", "sentiment", "y")
MAX_NAMED = 5  # how many offending values an error message lists


# -------------------------------------------------------------------------------------------- tables


@dataclass
class Table:
    """Rows of a file with where each came from: `lines[i]` is row i's file line (None: no lines)."""

    path: Path
    fmt: str
    rows: list[dict[str, Any]]
    columns: list[str]
    lines: list[int] | None

    def where(self, index: int) -> str:
        """'train.csv row 3 (line 4)' for the 0-based row `index`; jsonl rows are named by their line."""
        if self.lines is None:
            return f"{self.path} row {index + 1}"
        if self.fmt == "jsonl":
            return f"{self.path} line {self.lines[index]}"
        return f"{self.path} row {index + 1} (line {self.lines[index]})"


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a csv, tsv, jsonl, json (a list of objects) or parquet file, as dicts keyed by column.

    csv/tsv values are strings; json and parquet keep their types. Raises InputError for a missing file,
    an unknown extension, a file without rows, or a malformed line (named by its number).
    """
    return read_rows(Path(path)).rows


def read_rows(path: Path) -> Table:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    extension, _ = split_compression(path)
    fmt = TABLE_FORMATS.get(extension)
    if fmt is None:
        supported = ", ".join(sorted(TABLE_FORMATS))
        raise InputError(
            f"{path}: unknown file type '{extension or path.name}'; use one of {supported} "
            "(optionally .gz or .zst compressed)"
        )
    if fmt == "parquet":
        table = _read_parquet(path)
    else:
        parse = {"csv": _read_csv, "tsv": _read_csv, "jsonl": _read_jsonl, "json": _read_json}[fmt]
        table = parse(path, read_text(path))
    if not table.rows:
        raise InputError(f"{path}: no rows (the file is empty or holds only a header); add data rows")
    return table


def _read_csv(path: Path, text: str) -> Table:
    tsv = split_compression(path)[0] == ".tsv"
    csv.field_size_limit(sys.maxsize)
    # tsv: no quoting at all, since data like SST-2 has bare quotes (`" film "`) inside unquoted fields
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {"delimiter": ","}
    reader = csv.reader(io.StringIO(text, newline=""), **options)
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    try:
        header = next(reader, None)
        if header is None:
            return Table(path, "tsv" if tsv else "csv", [], [], lines)
        header = [name.strip() for name in header]
        duplicates = sorted({name for name in header if header.count(name) > 1})
        if duplicates:
            raise InputError(
                f"{path} line 1: duplicate column {', '.join(map(repr, duplicates))}; rename one"
            )
        for row in reader:
            if not row:  # blank line
                continue
            if len(row) != len(header):
                hint = "" if tsv else " (quote fields that contain commas)"
                raise InputError(
                    f"{path} line {reader.line_num}: {len(row)} fields, the header has {len(header)}{hint}"
                )
            rows.append(dict(zip(header, row)))
            lines.append(reader.line_num)
    except csv.Error as error:
        raise InputError(
            f"{path} line {reader.line_num}: malformed {'TSV' if tsv else 'CSV'} ({error})"
        ) from None
    return Table(path, "tsv" if tsv else "csv", rows, header, lines)


def _object(where: str, record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise InputError(
            f"{where}: expected a JSON object, found {type(record).__name__}; one object per record"
        )
    return record


def _read_jsonl(path: Path, text: str) -> Table:
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    for number, line in numbered_lines(text):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(
                f"{path} line {number}: not valid JSON ({error.msg} at column {error.colno}); "
                "each line must hold one JSON object"
            ) from None
        rows.append(_object(f"{path} line {number}", record))
        lines.append(number)
    return Table(path, "jsonl", rows, _columns(rows), lines)


def _read_json(path: Path, text: str) -> Table:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # JSON lines saved as .json
            return _read_jsonl(path, text)
        raise InputError(f"{path} line {error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(data, list):
        raise InputError(
            f"{path}: expected a list of objects, found a JSON {type(data).__name__}; "
            "use [{...}, {...}] or one object per line in a .jsonl file"
        )
    rows = [_object(f"{path} row {index + 1}", record) for index, record in enumerate(data)]
    return Table(path, "json", rows, _columns(rows), None)


def _read_parquet(path: Path) -> Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as error:  # not parquet, truncated, unreadable
        raise InputError(f"{path}: not a readable parquet file ({error})") from None
    return Table(path, "parquet", table.to_pylist(), list(table.column_names), None)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    """Keys of all records in order of first appearance (jsonl records need not share their keys)."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


# ------------------------------------------------------------------------------------ classification


@dataclass
class ClassificationData:
    """Texts (and optional second texts) with their raw label values, e.g. "0"/"1" or "positive"."""

    texts: list[str]
    pairs: list[str] | None
    labels: list[str] | None
    text_column: str
    pair_column: str | None
    label_column: str | None
    path: str

    def __len__(self) -> int:
        return len(self.texts)


def read_classification(
    path: str | Path,
    text_column: str | None = None,
    pair_column: str | None = None,
    label_column: str | None = None,
    require_labels: bool = True,
    limit: int = 0,
) -> ClassificationData:
    """Read a text-classification table; columns left as None are detected from their usual names.

    Args:
        limit: keep only the first `limit` rows (0: all).
        require_labels: False allows a file without a label column (prediction only).
    Raises:
        InputError: for a missing column, or a row with an empty text or label (named by row and line).
    """
    table = read_rows(Path(path))
    text = _column(table, text_column, TEXT_COLUMNS, "text", required=True)
    pair = _column(table, pair_column, PAIR_COLUMNS, "pair", required=False)
    label = _column(table, label_column, LABEL_COLUMNS, "label", required=require_labels)
    count = min(limit, len(table.rows)) if limit > 0 else len(table.rows)
    texts = [_text(table, index, text) for index in range(count)]
    pairs = [_text(table, index, pair) for index in range(count)] if pair else None
    labels = [_label(table, index, label) for index in range(count)] if label else None
    return ClassificationData(texts, pairs, labels, text, pair, label, str(path))


def _column(
    table: Table, name: str | None, candidates: Sequence[str], kind: str, required: bool
) -> str | None:
    columns = ", ".join(table.columns) or "none"
    flag = f"--data.{kind}_column"
    if name is not None:
        if name not in table.columns:
            raise InputError(f"{table.path}: no {kind} column '{name}'; columns are: {columns} (set {flag})")
        return name
    found = next((column for column in candidates if column in table.columns), None)
    if found is None and required:
        raise InputError(
            f"{table.path}: no {kind} column found (looked for {', '.join(candidates)}); "
            f"columns are: {columns} (set {flag})"
        )
    return found


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))  # NaN: pandas' empty cell


def _text(table: Table, index: int, column: str) -> str:
    value = table.rows[index].get(column)
    if _missing(value) or (isinstance(value, str) and not value.strip()):
        raise InputError(f"{table.where(index)}: empty {column!r}; fill it in or remove the row")
    if not isinstance(value, str):
        raise InputError(f"{table.where(index)}: {column!r} is a {type(value).__name__}, expected text")
    return value


def _label(table: Table, index: int, column: str) -> str:
    value = table.rows[index].get(column)
    if isinstance(value, bool):  # before int: bool is an int subclass
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 3.0 (a parquet/pandas float column) is the class "3"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    if _missing(value) or isinstance(value, str):
        raise InputError(f"{table.where(index)}: empty label {column!r}; fill it in or remove the row")
    raise InputError(f"{table.where(index)}: label {column!r} is a {type(value).__name__}, expected a value")


def _label_order(labels: Sequence[str]) -> list[str]:
    """Numeric labels sorted as numbers ("2" before "10"), anything else as strings."""
    try:
        return sorted(labels, key=lambda label: (float(label), label))
    except ValueError:
        return sorted(labels)


def label_names(
    train_labels: Sequence[str], eval_labels: Sequence[str] | None = None, eval_path: str = ""
) -> list[str]:
    """The sorted label set of the training data; every evaluation label must be one of them.

    Raises:
        InputError: naming (up to 5 of) the evaluation labels that training never saw.
    """
    names = _label_order(set(train_labels))
    if eval_labels is not None:
        unseen = _label_order(set(eval_labels) - set(names))
        if unseen:
            shown = ", ".join(repr(label) for label in unseen[:MAX_NAMED])
            more = f" and {len(unseen) - MAX_NAMED} more" if len(unseen) > MAX_NAMED else ""
            raise InputError(
                f"labels in {eval_path or 'the evaluation data'} missing from the training data: {shown}{more}; "
                "every evaluation label must occur in training"
            )
    return names
