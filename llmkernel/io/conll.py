"""CoNLL files for token classification: one `token ... tag` per line, blank lines between sentences."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmkernel.errors import InputError
from llmkernel.io.files import numbered_lines, read_text

TAG_PREFIXES = ("B", "I", "E", "S")  # BIO / IOB1 / BIOES; their order in `tag_names`


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
    for number, line in numbered_lines(read_text(path)):
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
