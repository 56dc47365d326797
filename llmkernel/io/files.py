"""Opening the files every stage reads: compression by extension, whole UTF-8 text, numbered lines.

`.gz` and `.zst` files are decompressed on the fly; the prepare readers stream them, the labeled-data
readers (tables, CoNLL, chat) read them whole. `iter_parts` reads the `clean/`/`excluded/` parts that
`llmk prepare` writes.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from llmkernel.errors import InputError

COMPRESSIONS = (".gz", ".zst")


def split_compression(path: Path) -> tuple[str, str | None]:
    """('.jsonl', '.gz') for 'x.jsonl.gz'; ('.txt', None) for 'x.txt'."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        return (suffixes[-2] if len(suffixes) > 1 else ""), suffixes[-1]
    return (suffixes[-1] if suffixes else ""), None


def open_binary(path: Path) -> IO[bytes]:
    _, compression = split_compression(path)
    try:
        if compression == ".gz":
            return gzip.open(path, "rb")
        if compression == ".zst":
            import zstandard

            return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return open(path, "rb")
    except OSError as error:
        raise InputError(f"{path}: cannot open ({error.strerror or error})") from None


def read_text(path: Path) -> str:
    with open_binary(path) as handle:
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


def numbered_lines(text: str) -> list[tuple[int, str]]:
    """(1-based number, line) split on newlines only: str.splitlines would also split inside a token or a
    JSON string at U+2028, U+0085 and other separators that tweets and web text do contain."""
    return [(number, line.rstrip("\r")) for number, line in enumerate(text.split("\n"), start=1)]


def iter_parts(folder: Path) -> Iterator[dict[str, Any]]:
    """The records of a clean/ or excluded/ folder, in order."""
    for part in sorted(folder.glob("part-*.jsonl.gz")):
        with gzip.open(part, "rt", encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)
