"""Labeled data for `llmk finetune` and `llmk evaluate`: classification tables, CoNLL tags, chat records.

Unlike the pretraining readers (`llmkernel.data.readers`), which count and skip bad records in a stream of
raw text, these files are small and every row is a training example: anything malformed is an InputError
that names the file, the line and the fix. Files are read whole.

Formats, chosen by extension (optionally .gz or .zst compressed): .csv and .tsv with a header row, .jsonl
(one object per line), .json (a list of objects), .parquet; CoNLL (one `token ... tag` per line) for tagging.
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

from llmkernel.data.readers import _open_binary, split_compression
from llmkernel.errors import InputError

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
TAG_PREFIXES = ("B", "I", "E", "S")  # BIO / IOB1 / BIOES; their order in `tag_names`
CHAT_ROLES = ("system", "user", "assistant")
MAX_NAMED = 5  # how many offending values an error message lists


# -------------------------------------------------------------------------------------------- tables


@dataclass
class _Table:
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
    return _read_rows(Path(path)).rows


def _read_rows(path: Path) -> _Table:
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
        table = parse(path, _read_text(path))
    if not table.rows:
        raise InputError(f"{path}: no rows (the file is empty or holds only a header); add data rows")
    return table


def _read_text(path: Path) -> str:
    with _open_binary(path) as handle:
        try:
            data = handle.read()
        except (OSError, EOFError) as error:
            raise InputError(f"{path}: cannot read, the file may be corrupt ({error})") from None
    try:
        return data.decode("utf-8-sig")  # -sig: spreadsheet exports often start with a byte-order mark
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise InputError(
            f"{path} line {line}: not UTF-8 text ({error.reason}); save the file as UTF-8"
        ) from None


def _numbered_lines(text: str) -> list[tuple[int, str]]:
    """(1-based number, line) split on newlines only: str.splitlines would also split inside a token or a
    JSON string at U+2028, U+0085 and other separators that tweets and web text do contain."""
    return [(number, line.rstrip("\r")) for number, line in enumerate(text.split("\n"), start=1)]


def _read_csv(path: Path, text: str) -> _Table:
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
            return _Table(path, "tsv" if tsv else "csv", [], [], lines)
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
    return _Table(path, "tsv" if tsv else "csv", rows, header, lines)


def _object(where: str, record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise InputError(
            f"{where}: expected a JSON object, found {type(record).__name__}; one object per record"
        )
    return record


def _read_jsonl(path: Path, text: str) -> _Table:
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    for number, line in _numbered_lines(text):
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
    return _Table(path, "jsonl", rows, _columns(rows), lines)


def _read_json(path: Path, text: str) -> _Table:
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
    return _Table(path, "json", rows, _columns(rows), None)


def _read_parquet(path: Path) -> _Table:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for a file that is not parquet
        raise InputError(f"{path}: not a readable parquet file ({error})") from None
    return _Table(path, "parquet", table.to_pylist(), list(table.column_names), None)


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
    table = _read_rows(Path(path))
    text = _column(table, text_column, TEXT_COLUMNS, "text", required=True)
    pair = _column(table, pair_column, PAIR_COLUMNS, "pair", required=False)
    label = _column(table, label_column, LABEL_COLUMNS, "label", required=require_labels)
    count = min(limit, len(table.rows)) if limit > 0 else len(table.rows)
    texts = [_text(table, index, text) for index in range(count)]
    pairs = [_text(table, index, pair) for index in range(count)] if pair else None
    labels = [_label(table, index, label) for index in range(count)] if label else None
    return ClassificationData(texts, pairs, labels, text, pair, label, str(path))


def _column(
    table: _Table, name: str | None, candidates: Sequence[str], kind: str, required: bool
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


def _text(table: _Table, index: int, column: str) -> str:
    value = table.rows[index].get(column)
    if _missing(value) or (isinstance(value, str) and not value.strip()):
        raise InputError(f"{table.where(index)}: empty {column!r}; fill it in or remove the row")
    if not isinstance(value, str):
        raise InputError(f"{table.where(index)}: {column!r} is a {type(value).__name__}, expected text")
    return value


def _label(table: _Table, index: int, column: str) -> str:
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


# ---------------------------------------------------------------------------------------------- CoNLL


@dataclass
class TaggedSentence:
    """One sentence of a CoNLL file; `line` is the file line of its first token."""

    tokens: list[str]
    tags: list[str]
    line: int


def read_conll(path: str | Path) -> list[TaggedSentence]:
    """Sentences of a CoNLL file: one token per line (token first, tag last), blank lines between sentences.

    Fields are separated by tabs, or by spaces when the first token line has no tab; every token line must
    have as many fields as the first. `-DOCSTART-` lines are skipped. Tags are `O` or `B-`/`I-`/`E-`/`S-`
    followed by a type (BIO, IOB1 or BIOES).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    sentences: list[TaggedSentence] = []
    current = TaggedSentence([], [], 0)
    separator: str | None = None  # "\t", or None: any run of whitespace (str.split's default)
    fields = 0
    for number, line in _numbered_lines(_read_text(path)):
        if not line.strip():  # blank (or tab-only, as in the original WNUT-17 train file): sentence ends
            if current.tokens:
                sentences.append(current)
            current = TaggedSentence([], [], 0)
            continue
        if line.startswith("-DOCSTART-"):
            continue
        if fields == 0:
            separator = "\t" if "\t" in line else None
        parts = line.split(separator)
        if separator == "\t":
            parts = [part.strip() for part in parts]
        if len(parts) < 2 or (fields and len(parts) != fields):
            expected = fields or 2
            names = "token and tag" if expected == 2 else "token first, tag last"
            between = "a tab" if separator == "\t" else "spaces"
            raise InputError(
                f"{path} line {number}: expected {expected} fields ({names}) separated by {between}, "
                f"found {len(parts)}"
            )
        fields = fields or len(parts)
        if not parts[0]:
            raise InputError(f"{path} line {number}: empty token; the token must be the first field")
        _check_tag(path, number, parts[-1])
        if not current.tokens:
            current.line = number
        current.tokens.append(parts[0])
        current.tags.append(parts[-1])
    if current.tokens:
        sentences.append(current)
    if not sentences:
        raise InputError(f"{path}: no sentences; expected one `token<TAB>tag` per line, blank lines between")
    return sentences


def _check_tag(path: Path, number: int, tag: str) -> None:
    prefix, _, entity = tag.partition("-")
    if tag != "O" and not (prefix in TAG_PREFIXES and entity):
        raise InputError(
            f"{path} line {number}: tag {tag!r} is not O or B-/I-/E-/S- followed by a type (e.g. B-person); "
            "the tag must be the last field"
        )


def tag_names(sentences: Sequence[TaggedSentence]) -> list[str]:
    """All tags: "O" first, then by entity type, and within a type by B, I, E, S (B-x next to I-x)."""
    tags = {tag for sentence in sentences for tag in sentence.tags} - {"O"}

    def order(tag: str) -> tuple[str, int]:
        prefix, _, entity = tag.partition("-")
        return entity, TAG_PREFIXES.index(prefix)

    return ["O", *sorted(tags, key=order)]


# ----------------------------------------------------------------------------------------------- chat

CHAT_SHAPES = (
    '"messages" (a list of {"role", "content"}), "prompt" + "response", '
    'or "instruction" (+ "input") + "output"'
)


def read_chat(path: str | Path) -> list[list[dict[str, str]]]:
    """Conversations from jsonl (or a json list) as lists of {"role", "content"} messages.

    A record holds `messages` (OpenAI shape, roles system/user/assistant), `prompt` + `response`, or
    Alpaca's `instruction` (+ optional `input`) + `output`; the last two become one user and one assistant
    message. Every conversation must contain an assistant message: that is what fine-tuning learns.
    """
    table = _read_rows(Path(path))
    return [_conversation(table.where(index), row) for index, row in enumerate(table.rows)]


def _conversation(where: str, record: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise InputError(f'{where}: \'messages\' must be a list of {{"role", "content"}} objects')
        conversation = [_message(where, position, message) for position, message in enumerate(messages, 1)]
    elif "prompt" in record and "response" in record:
        conversation = [
            _message(where, 1, {"role": "user", "content": record["prompt"]}, "prompt"),
            _message(where, 2, {"role": "assistant", "content": record["response"]}, "response"),
        ]
    elif "instruction" in record and "output" in record:
        instruction, extra = record["instruction"], record.get("input")
        if isinstance(instruction, str) and isinstance(extra, str) and extra.strip():
            instruction = f"{instruction}\n\n{extra}"
        elif extra is not None and not isinstance(extra, str):
            raise InputError(f"{where}: 'input' is a {type(extra).__name__}, expected a string")
        conversation = [
            _message(where, 1, {"role": "user", "content": instruction}, "instruction"),
            _message(where, 2, {"role": "assistant", "content": record["output"]}, "output"),
        ]
    else:
        keys = ", ".join(map(repr, record)) or "none"
        raise InputError(f"{where}: unknown record shape (keys: {keys}); expected {CHAT_SHAPES}")
    if not any(message["role"] == "assistant" for message in conversation):
        raise InputError(f"{where}: no assistant message; each conversation needs a reply to learn from")
    return conversation


def _message(where: str, position: int, message: Any, key: str = "") -> dict[str, str]:
    name = f"'{key}'" if key else f"message {position}"
    if not isinstance(message, dict):
        raise InputError(f'{where}: {name} is a {type(message).__name__}, expected {{"role", "content"}}')
    role, content = message.get("role"), message.get("content")
    if role not in CHAT_ROLES:
        raise InputError(f"{where}: {name} has role {role!r}; roles are {', '.join(CHAT_ROLES)}")
    if not isinstance(content, str):
        raise InputError(f"{where}: {name} content is {type(content).__name__}, expected a string")
    return {"role": role, "content": content}
