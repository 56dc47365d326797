"""Readers: files, folders and globs in; a stream of documents out.

Formats: .txt (one document per file, per blank-line paragraph or per line), .jsonl/.json (a text field),
.csv/.tsv (a column), .parquet (a column), .html/.htm (whole page, marked as HTML), each optionally
compressed with .gz or .zst. Everything streams: memory is bounded by the largest single document.

Bad input is counted, not fatal: undecodable bytes are dropped and counted, malformed records are counted
with their first few line numbers (`strict` makes them fatal). What cannot go on at all (a missing path, a
wrong text field) raises an InputError naming the problem and the fix.
"""

from __future__ import annotations

import codecs
import csv
import glob
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkernel.data.config import InputSpec
from llmkernel.errors import InputError
from llmkernel.io.files import open_binary, split_compression

BUILTIN_DEMO = "builtin:python-docs"
TEXT_FIELDS = ("text", "content", "sentence", "body", "document", "html")  # auto-detection order
EXTENSIONS = {
    ".txt": "txt",
    ".text": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".html": "html",
    ".htm": "html",
}
MAX_REPORTED_LINES = 5


@dataclass
class Document:
    id: str
    source: str
    text: str
    html: bool = False


@dataclass
class ReadStats:
    """What the readers saw: files, bytes, and everything they had to skip."""

    files: int = 0
    documents: int = 0
    bytes: int = 0
    undecodable_bytes: int = 0
    malformed_records: int = 0
    malformed_examples: list[str] = field(default_factory=list)  # "file:line: why", first few only
    empty_records: int = 0
    unreported: list[tuple[str, str]] = field(
        default_factory=list
    )  # malformed (where, why) not yet in excluded/

    def malformed(self, where: str, why: str, strict: bool) -> None:
        if strict:
            raise InputError(f"{where}: {why} (drop --strict to count and skip malformed records)")
        self.malformed_records += 1
        self.unreported.append((where, why))
        if len(self.malformed_examples) < MAX_REPORTED_LINES:
            self.malformed_examples.append(f"{where}: {why}")


# -------------------------------------------------------------------------------- undecodable bytes

_UNDECODABLE = [0]


def _count_and_skip(error: UnicodeDecodeError) -> tuple[str, int]:
    _UNDECODABLE[0] += error.end - error.start
    return "", error.end


codecs.register_error("llmk_count_skip", _count_and_skip)


def _decode(data: bytes, stats: ReadStats) -> str:
    before = _UNDECODABLE[0]
    text = data.decode("utf-8", errors="llmk_count_skip")
    stats.undecodable_bytes += _UNDECODABLE[0] - before
    return text


# ---------------------------------------------------------------------------------------- resolving


def format_of(spec: InputSpec, path: Path) -> str:
    if spec.format != "auto":
        return spec.format
    extension, _ = split_compression(path)
    fmt = EXTENSIONS.get(extension)
    if fmt is None:
        raise InputError(
            f"{path}: unknown file type '{extension or path.name}'; set format in a recipe input"
        )
    return fmt


def resolve_inputs(specs: list[InputSpec]) -> list[tuple[InputSpec, Path | None]]:
    """Expand folders and globs into files (sorted); the demo corpus gives (spec, None)."""
    if not specs:
        raise InputError(
            "no inputs given: pass files, folders or globs, e.g. `llmk prepare data/*.txt --out runs/data`"
        )
    resolved: list[tuple[InputSpec, Path | None]] = []
    for spec in specs:
        if spec.path == BUILTIN_DEMO:
            resolved.append((spec, None))
            continue
        path = Path(spec.path).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(
                p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".") and _known(spec, p)
            )
            if not files:
                raise InputError(
                    f"{path}: folder has no readable files ({', '.join(sorted(EXTENSIONS))}, optionally .gz/.zst)"
                )
        elif any(ch in spec.path for ch in "*?["):
            files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not files:
                raise InputError(f"{spec.path}: no files match this pattern")
        else:
            raise InputError(f"{spec.path}: no such file or folder")
        resolved.extend((spec, f) for f in files)
    return resolved


def _known(spec: InputSpec, path: Path) -> bool:
    return spec.format != "auto" or split_compression(path)[0] in EXTENSIONS


# ------------------------------------------------------------------------------------------ reading


def _read_all(path: Path, stats: ReadStats) -> str:
    with open_binary(path) as handle:
        try:
            data = handle.read()
        except (OSError, EOFError) as error:
            raise InputError(f"{path}: cannot read, the file may be corrupt ({error})") from None
    stats.bytes += len(data)
    return _decode(data, stats)


def _lines(path: Path, stats: ReadStats) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line) without holding the file in memory."""
    with open_binary(path) as raw:
        reader = io.BufferedReader(raw) if not isinstance(raw, io.BufferedReader) else raw
        try:
            for number, line in enumerate(reader, start=1):
                stats.bytes += len(line)
                yield number, _decode(line, stats)
        except (OSError, EOFError) as error:
            raise InputError(f"{path}: cannot read, the file may be corrupt ({error})") from None


def read_documents(
    spec: InputSpec, path: Path | None, stats: ReadStats, strict: bool = False
) -> Iterator[Document]:
    """Every document of one input file, in file order."""
    if path is None:
        yield from _builtin_documents(spec, stats)
        return
    stats.files += 1
    fmt = format_of(spec, path)
    source = spec.source or str(path)
    reader = {
        "txt": _read_txt,
        "jsonl": _read_jsonl,
        "json": _read_json,
        "csv": _read_table,
        "tsv": _read_table,
        "parquet": _read_parquet,
        "html": _read_html,
    }[fmt]
    for document in reader(spec, path, source, stats, strict, fmt):
        if document.text.strip():
            stats.documents += 1
            yield document
        else:
            stats.empty_records += 1


def _read_txt(spec, path, source, stats, strict, fmt) -> Iterator[Document]:
    if spec.split == "file":
        yield Document(source, source, _read_all(path, stats), bool(spec.html))
        return
    block: list[str] = []
    start = 1
    for number, line in _lines(path, stats):
        if spec.split == "line":
            yield Document(f"{source}:{number}", source, line.rstrip("\r\n"), bool(spec.html))
        elif line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            yield Document(f"{source}:{start}", source, "".join(block), bool(spec.html))
            block = []
    if block:
        yield Document(f"{source}:{start}", source, "".join(block), bool(spec.html))


def _pick_field(spec: InputSpec, path: Path, available: list[str]) -> str:
    if spec.text_field:
        if spec.text_field not in available:
            raise InputError(
                f"{path}: no field '{spec.text_field}'; records have: {', '.join(available) or 'no fields'}; "
                "set text_field to one of them"
            )
        return spec.text_field
    for name in TEXT_FIELDS:
        if name in available:
            return name
    raise InputError(
        f"{path}: no text field found (looked for {', '.join(TEXT_FIELDS)}); records have: "
        f"{', '.join(available) or 'no fields'}; set text_field in a recipe input or --text_field"
    )


def _records(spec, path, source, stats, strict, records: Iterator[tuple[str, Any]]) -> Iterator[Document]:
    """Documents from (location, record) pairs, with the text field chosen on the first record."""
    text_field = None
    for where, record in records:
        if not isinstance(record, dict):
            stats.malformed(where, "record is not a JSON object", strict)
            continue
        if text_field is None:
            text_field = _pick_field(spec, path, list(record))
        value = record.get(text_field)
        if not isinstance(value, str):
            stats.malformed(where, f"field '{text_field}' is missing or not a string", strict)
            continue
        is_html = spec.html if spec.html is not None else text_field == "html"
        doc_id = f"{source}:{record['id']}" if isinstance(record.get("id"), str | int) else where
        yield Document(doc_id, source, value, is_html)


def _read_jsonl(spec, path, source, stats, strict, fmt) -> Iterator[Document]:
    def parsed() -> Iterator[tuple[str, Any]]:
        for number, line in _lines(path, stats):
            if not line.strip():
                continue
            try:
                yield f"{source}:{number}", json.loads(line)
            except json.JSONDecodeError as error:
                stats.malformed(f"{path}:{number}", f"not valid JSON ({error.msg})", strict)

    yield from _records(spec, path, source, stats, strict, parsed())


def _read_json(spec, path, source, stats, strict, fmt) -> Iterator[Document]:
    text = _read_all(path, stats)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # JSON lines in a .json file
            stats.bytes -= len(text.encode())
            yield from _read_jsonl(spec, path, source, stats, strict, fmt)
            return
        raise InputError(f"{path}: not valid JSON at line {error.lineno}: {error.msg}") from None
    if isinstance(data, dict):  # {"data": [...]} and similar wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of records or an object holding one")
    yield from _records(
        spec, path, source, stats, strict, ((f"{source}[{i}]", r) for i, r in enumerate(data))
    )


def _read_table(spec, path, source, stats, strict, fmt) -> Iterator[Document]:
    csv.field_size_limit(sys.maxsize)
    delimiter = "\t" if fmt == "tsv" else ","

    def text_lines() -> Iterator[str]:
        for _, line in _lines(path, stats):
            yield line

    reader = csv.reader(text_lines(), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    header = [h.lstrip("\ufeff").strip() for h in header]
    column = _pick_field(spec, path, header)
    index = header.index(column)
    is_html = spec.html if spec.html is not None else column == "html"
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row:
                continue
            if len(row) != len(header):
                stats.malformed(where, f"{len(row)} fields, the header has {len(header)}", strict)
                continue
            yield Document(f"{source}:{reader.line_num}", source, row[index], is_html)
    except csv.Error as error:
        raise InputError(f"{path}:{reader.line_num}: malformed {fmt.upper()} ({error})") from None


def _read_parquet(spec, path, source, stats, strict, fmt) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as error:  # not parquet, truncated, unreadable
        raise InputError(f"{path}: not a readable parquet file ({error})") from None
    column = _pick_field(spec, path, parquet.schema_arrow.names)
    is_html = spec.html if spec.html is not None else column == "html"
    row = 0
    for batch in parquet.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                stats.malformed(f"{path}:row {row}", f"column '{column}' is not a string", strict)
                continue
            stats.bytes += len(value.encode())
            yield Document(f"{source}:{row}", source, value, is_html)


def _read_html(spec, path, source, stats, strict, fmt) -> Iterator[Document]:
    yield Document(source, source, _read_all(path, stats), True if spec.html is None else spec.html)


# ------------------------------------------------------------------------------ the embedded corpus

DEMO_MODULES = (
    "abc argparse array ast asyncio base64 bisect calendar codecs collections contextlib copy csv dataclasses "
    "datetime decimal difflib dis email.message enum fnmatch fractions functools gettext glob gzip hashlib heapq "
    "hmac html.parser http.client inspect io ipaddress itertools json locale logging math mimetypes operator "
    "pathlib pickle platform pprint queue random re sched secrets shlex shutil socket sqlite3 statistics string "
    "struct subprocess tarfile tempfile textwrap threading time traceback typing unittest urllib.parse uuid "
    "warnings weakref xml.etree.ElementTree zipfile zlib"
).split()


def _module_docs(name: str) -> str:
    """A module's docstring followed by those of its public classes and functions."""
    import importlib
    import inspect

    module = importlib.import_module(name)
    parts = [f"{name}\n\n{inspect.getdoc(module) or ''}"]
    parts += [f"{qualname}\n\n{doc}" for qualname, doc in stdlib_docstrings(name)]
    return "\n\n".join(parts)


def stdlib_docstrings(name: str, methods: bool = False) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of module `name`'s public classes and functions (and their public
    methods, with `methods`), each docstring once: inherited ones repeat (e.g. decimal's exceptions)."""
    import importlib
    import inspect
    import warnings

    module = importlib.import_module(name)
    seen = set()
    with warnings.catch_warnings():  # e.g. typing.io's deprecation warning when its docstring is read
        warnings.simplefilter("ignore")
        for attr, value in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if not (inspect.isclass(value) or inspect.isfunction(value)):
                continue
            members = [(f"{name}.{attr}", value)]
            if methods and inspect.isclass(value):
                members += [
                    (f"{name}.{attr}.{member}", function)
                    for member, function in sorted(vars(value).items())
                    if not member.startswith("_") and inspect.isfunction(function)
                ]
            for qualname, member in members:
                doc = inspect.getdoc(member)
                if doc and doc not in seen:
                    seen.add(doc)
                    yield qualname, doc


def _builtin_documents(spec: InputSpec, stats: ReadStats) -> Iterator[Document]:
    """The demo corpus every Python has: the pydoc topic pages and standard-library docstrings."""
    from pydoc_data.topics import topics

    stats.files += 1
    for name in sorted(topics):
        text = topics[name]
        stats.bytes += len(text.encode())
        stats.documents += 1
        yield Document(f"{BUILTIN_DEMO}/topics/{name}", f"{BUILTIN_DEMO}/topics", text)
    for name in DEMO_MODULES:
        try:
            text = _module_docs(name)
        except ImportError:  # a Python built without this module (e.g. no sqlite3)
            continue
        stats.bytes += len(text.encode())
        stats.documents += 1
        yield Document(f"{BUILTIN_DEMO}/modules/{name}", f"{BUILTIN_DEMO}/modules", text)


def builtin_fingerprint() -> dict[str, Any]:
    """run.json's input record for the demo corpus: it changes with the Python version."""
    import hashlib

    digest = hashlib.sha256()
    size = 0
    for document in _builtin_documents(InputSpec(path=BUILTIN_DEMO), ReadStats()):
        data = document.text.encode()
        digest.update(data)
        size += len(data)
    return {"path": BUILTIN_DEMO, "bytes": size, "sha256": digest.hexdigest()}
