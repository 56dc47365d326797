"""The report as plain data: sections of headings, text, tables, figures and code blocks.

The section builders fill these and know nothing of HTML or Markdown; `html.py` and `markdown.py` each
render the same document, so the page and its Markdown twin cannot drift apart.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Heading:
    text: str


@dataclass
class Text:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Any]]  # cells are formatted with `cell` when rendered


@dataclass
class Figure:
    """A PNG plot: inlined as a data: URI in the page, a file under report_files/ for the Markdown."""

    name: str  # file stem; made unique across the report when it is assembled
    png: bytes
    alt: str  # what the plot shows, for readers who cannot see it (and the browser test)


@dataclass
class Code:
    """Preformatted text (a resolved config as YAML, a sample); `summary` folds it in the page."""

    text: str
    summary: str = ""


Block = Heading | Text | Table | Figure | Code


@dataclass
class Section:
    id: str  # the HTML id and the table of contents' anchor
    title: str
    intro: str
    blocks: list[Block] = field(default_factory=list)

    def figures(self) -> list[Figure]:
        return [block for block in self.blocks if isinstance(block, Figure)]


def cell(value: Any) -> str:
    """A table cell: thousands separators for integers, 4 significant digits for other numbers, '—' for
    nothing, so columns of metrics read alike however the stage stored them."""
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e9 or abs(value) < 1e-3):
            return f"{value:.3e}"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    return str(value)


def megabytes(value: Any) -> float | None:
    return value / 1e6 if isinstance(value, int | float) else None


def slug(text: str) -> str:
    """A file-name-safe stem (figure files of the Markdown twin)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "figure"


def unique_figure_names(sections: list[Section]) -> None:
    """Give every figure of the report its own file name (two runs in folders of the same name)."""
    used: set[str] = set()
    for section in sections:
        for figure in section.figures():
            stem = name = slug(figure.name)
            number = 1
            while name in used:
                number += 1
                name = f"{stem}-{number}"
            used.add(name)
            figure.name = name


@dataclass
class Report:
    """The whole page: a title, a line saying what it was built from, the runs it covers, the sections."""

    title: str
    subtitle: str
    runs: list[str]
    sections: list[Section]
