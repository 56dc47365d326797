"""`ReportConfig`: the schema of `llmk report` (CLI flags and the `report` section of a config file)."""

from __future__ import annotations

from dataclasses import dataclass

from llmkernel.config import check, option

MAX_SAMPLE_TOKENS = 200  # the report samples to show what a model writes, not to benchmark it


@dataclass
class ReportConfig:
    """`llmk report RUN_DIR...`: curves, tables and trade-offs of run folders on one page."""

    runs: list[str] = option(
        help="run folders (each with run.json), or a recipe's output folder holding them in subfolders",
        factory=list,
        positional=True,
    )
    out: str = option("runs/report", "folder for report.html, report.md and report_files/ (the plots)")
    title: str = option("", "title of the page (default: 'LLM Kernel report' and the folders' names)")
    samples: int = option(
        2, "prompts per decoder model that the report continues itself, greedy and sampled (0: none)"
    )
    sample_tokens: int = option(40, "new tokens of each continuation the report generates")
    seed: int = option(0, "seed of the sampled continuations")

    def __post_init__(self) -> None:
        check(bool(self.runs), "runs", "give at least one run folder: `llmk report RUN_DIR...`")
        check(self.samples >= 0, "samples", "must be >= 0 (0: the report generates nothing)")
        check(
            1 <= self.sample_tokens <= MAX_SAMPLE_TOKENS,
            "sample_tokens",
            f"must be between 1 and {MAX_SAMPLE_TOKENS}",
        )
