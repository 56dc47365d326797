"""`llmk report RUN_DIR...`: read the run folders, build the sections, write report.html and report.md.

`write_report` is the plain function (`llmk run` and `llmk demo` call it at the end); `report` is the
stage entry that takes a ReportConfig. Sections come in the order a reader follows the pipeline: data,
training, evaluation, compression, generations, then every run's config and wall time. The output folder
gets report.html (self-contained), report.md and report_files/ (the Markdown's PNGs); each file is
written atomically, and nothing else in the folder is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llmkernel import __version__
from llmkernel.errors import ConfigError
from llmkernel.report.collect import Run, find_runs
from llmkernel.report.config import ReportConfig
from llmkernel.report.document import Report, Section, unique_figure_names
from llmkernel.report.render import FILES, figure_path, render_html, render_markdown
from llmkernel.report.results import compression_section, evaluation_section
from llmkernel.report.samples import generations_section
from llmkernel.report.sections import configs_section, data_section, training_section
from llmkernel.runs import MANIFEST, atomic_write_bytes, atomic_write_text, check_writable_parent

HTML_FILE, MARKDOWN_FILE = "report.html", "report.md"


def build_sections(
    runs: list[Run], samples: int = 2, sample_tokens: int = 40, seed: int = 0
) -> list[Section]:
    """Every section that the runs have something for, in reading order (configs always)."""
    sections = [
        data_section(runs),
        training_section(runs),
        evaluation_section(runs),
        compression_section(runs),
        generations_section(runs, samples, sample_tokens, seed),
        configs_section(runs),
    ]
    found = [section for section in sections if section is not None]
    unique_figure_names(found)
    return found


def _title(folders: Sequence[str | Path], title: str) -> str:
    if title:
        return title
    names = ", ".join(Path(folder).resolve().name for folder in folders[:3])
    return f"LLM Kernel report: {names}{' ...' if len(folders) > 3 else ''}"


def _check_out(out: Path) -> None:
    check_writable_parent(out)
    if (out / MANIFEST).is_file():
        raise ConfigError(
            f"out: {out} is a run folder (it has run.json); write the report to a folder of its own"
        )


def _write(out: Path, report: Report) -> tuple[Path, Path]:
    """The PNGs first, then report.md and report.html, so a page never names a plot that is not there."""
    files = out / FILES
    files.mkdir(parents=True, exist_ok=True)
    written = set()
    for section in report.sections:
        for figure in section.figures():
            atomic_write_bytes(out / figure_path(figure), figure.png)
            written.add(f"{figure.name}.png")
    for stale in files.glob("*.png"):  # plots of an earlier report of other runs
        if stale.name not in written:
            stale.unlink()
    atomic_write_text(out / MARKDOWN_FILE, render_markdown(report))
    atomic_write_text(out / HTML_FILE, render_html(report))
    return out / HTML_FILE, out / MARKDOWN_FILE


def write_report(
    folders: Sequence[str | Path],
    out: str | Path = "runs/report",
    title: str = "",
    samples: int = 2,
    sample_tokens: int = 40,
    seed: int = 0,
) -> dict[str, Any]:
    """Write report.html, report.md and report_files/ into `out` for run folders (or their parents).

    Args:
        folders: run folders (with run.json) or folders holding them, such as a recipe's output folder.
        out: the report's folder (created; other files in it are left alone).
        title: the page's title (default: from the folders' names).
        samples: prompts per decoder folder the report continues itself (0: generate nothing).
        sample_tokens: new tokens per continuation.
        seed: seed of the sampled continuations.

    Returns:
        {"html", "markdown": paths, "runs": count, "sections": [section ids], "figures": count}.

    Raises:
        InputError: a folder is missing or holds no run; ConfigError: `out` cannot take the report.
    """
    out = Path(out)
    _check_out(out)
    runs = find_runs(folders)
    sections = build_sections(runs, samples, sample_tokens, seed)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = (
        f"Built by `llmk report` (llmk {__version__}) on {when} from {len(runs)} run folders; "
        "self-contained: it opens with no network."
    )
    document = Report(_title(folders, title), subtitle, [run.label for run in runs], sections)
    html_path, markdown_path = _write(out, document)
    figures = sum(len(section.figures()) for section in sections)
    print(
        f"report of {len(runs)} runs ({', '.join(s.id for s in sections)}; {figures} plots) written to "
        f"{html_path} and {markdown_path}"
    )
    return {
        "html": str(html_path),
        "markdown": str(markdown_path),
        "runs": len(runs),
        "sections": [section.id for section in sections],
        "figures": figures,
    }


def report(config: ReportConfig) -> dict[str, Any]:
    """`llmk report`: the stage entry of stages.py."""
    return write_report(
        config.runs, config.out, config.title, config.samples, config.sample_tokens, config.seed
    )
