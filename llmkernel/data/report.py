"""What `llmk prepare` counts at each step, saved as stats.json and printed as a summary table."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from llmkernel.data.readers import ReadStats

STEPS = ("read", "clean", "filter", "dedup", "pii", "tokenizer", "pack")
MB = 1e6


@dataclass
class StepStats:
    """Documents and bytes into and out of one step, and the CPU seconds it took (summed over workers)."""

    documents_in: int = 0
    bytes_in: int = 0
    documents_out: int = 0
    bytes_out: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "documents_in": self.documents_in,
            "bytes_in": self.bytes_in,
            "documents_out": self.documents_out,
            "bytes_out": self.bytes_out,
            "seconds": round(self.seconds, 3),
            "mb_per_s": round(self.bytes_in / MB / self.seconds, 2) if self.seconds > 0 else None,
        }


@dataclass
class PrepareStats:
    steps: dict[str, StepStats] = field(default_factory=lambda: {s: StepStats() for s in STEPS})
    read: ReadStats = field(default_factory=ReadStats)
    changed: Counter = field(default_factory=Counter)  # clean actions -> documents changed by them
    dropped: Counter = field(default_factory=Counter)  # reason -> documents
    duplicate_clusters: int = 0
    pii: Counter = field(default_factory=Counter)  # type -> spans masked in kept documents
    documents_with_pii: int = 0
    languages: Counter = field(default_factory=Counter)  # language -> kept documents
    tokens: dict[str, int] = field(default_factory=dict)
    documents_split: dict[str, int] = field(default_factory=dict)
    vocab_size: int = 0
    wall_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        read = self.read
        return {
            "input": {
                "files": read.files,
                "documents": read.documents,
                "bytes": read.bytes,
                "empty_records": read.empty_records,
                "undecodable_bytes": read.undecodable_bytes,
                "malformed_records": read.malformed_records,
                "malformed_examples": read.malformed_examples,
            },
            "steps": {name: step.to_dict() for name, step in self.steps.items()},
            "changed_by_clean": dict(self.changed.most_common()),
            "dropped": dict(self.dropped.most_common()),
            "duplicate_clusters": self.duplicate_clusters,
            "pii_masked": dict(self.pii.most_common()),
            "documents_with_pii": self.documents_with_pii,
            "languages": dict(self.languages.most_common()),
            "tokenizer": {"vocab_size": self.vocab_size},
            "tokens": self.tokens,
            "documents_by_split": self.documents_split,
            "output": {"documents": self.steps["pii"].documents_out, "bytes": self.steps["pii"].bytes_out},
            "wall_seconds": round(self.wall_seconds, 3),
            "mb_per_s": round(read.bytes / MB / self.wall_seconds, 3) if self.wall_seconds else None,
        }


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _counter_line(counter: dict[str, int], empty: str = "none") -> str:
    return ", ".join(f"{k} {v:,}" for k, v in counter.items()) if counter else empty


def summary(stats: dict[str, Any], out: str) -> str:
    """The table printed at the end of `llmk prepare` (built from stats.json's dict)."""
    rows = []
    for name, step in stats["steps"].items():
        rows.append(
            [
                name,
                f"{step['documents_in']:,}",
                f"{step['documents_out']:,}",
                f"{step['bytes_in'] / MB:,.2f}",
                f"{step['bytes_out'] / MB:,.2f}",
                f"{step['seconds']:.1f}",
                "-" if step["mb_per_s"] is None else f"{step['mb_per_s']:,.1f}",
            ]
        )
    source = stats["input"]
    lines = [
        f"llmk prepare -> {out}",
        "",
        _table(["step", "docs in", "docs out", "MB in", "MB out", "seconds", "MB/s"], rows),
        "",
        f"input       {source['files']:,} files, {source['documents']:,} documents, {source['bytes'] / MB:,.2f} MB"
        f"; skipped: {source['empty_records']:,} empty, {source['malformed_records']:,} malformed records, "
        f"{source['undecodable_bytes']:,} undecodable bytes",
    ]
    if source["malformed_examples"]:
        lines.append("            first malformed: " + "; ".join(source["malformed_examples"]))
    lines += [
        f"cleaned     {_counter_line(stats['changed_by_clean'])} (documents changed)",
        f"dropped     {_counter_line(stats['dropped'])}",
        f"duplicates  {stats['duplicate_clusters']:,} clusters of near/exact copies (one kept from each)",
        f"pii masked  {_counter_line(stats['pii_masked'])} in {stats['documents_with_pii']:,} documents",
        f"languages   {_counter_line(dict(list(stats['languages'].items())[:8]))} (kept documents)",
        f"tokenizer   vocabulary {stats['tokenizer']['vocab_size']:,}",
        f"tokens      {_counter_line(stats['tokens'], 'not packed')} "
        f"({_counter_line(stats['documents_by_split'], '-')} documents)",
        f"throughput  {stats['mb_per_s'] or 0:,.2f} MB/s end to end, {stats['wall_seconds']:.1f} s wall",
    ]
    return "\n".join(lines)
