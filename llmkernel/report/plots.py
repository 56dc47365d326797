"""The report's plots, drawn with matplotlib's Agg backend into PNG bytes.

Each function takes plain numbers and returns PNG bytes, which the page inlines as a data: URI and the
Markdown twin writes beside itself. Bare `Figure` objects (no pyplot) leave no global state behind
between plots or between reports in one process.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DPI = 100
WIDTH = 10.0  # inches: 1000 pixels, the width of the page's text column
LABEL_WIDTH = 32  # characters of a bar's name on its axis
MUTED = "#9aa4ae"
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _figure(height: float, width: float = WIDTH):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def to_png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _shorten(label: str, width: int = LABEL_WIDTH) -> str:
    """Long tick labels would squeeze a panel to nothing; the tables beside the plots keep the full names."""
    return label if len(label) <= width else label[: width - 1] + "…"


def _empty(axes: Any, message: str) -> None:
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes, color="#666666")
    axes.set_xticks([])
    axes.set_yticks([])


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), int | float)]
    return [p[0] for p in points], [p[1] for p in points]


def _style(count: int) -> str:
    """Lines with point markers while the points are few enough to see (one logged step has no line)."""
    return ".-" if count <= 40 else "-"


def training_curves(train: Sequence[dict[str, Any]], val: Sequence[dict[str, Any]], title: str) -> bytes:
    """Four panels over optimizer steps: train and validation loss, learning rate, tokens/s and MFU."""
    figure = _figure(6.5)
    figure.suptitle(title)
    loss, rate, speed, mfu = figure.subplots(2, 2).flat
    steps, values = _series(train, "loss")
    loss.plot(steps, values, _style(len(steps)), color=COLOURS[0], label="train")
    val_steps, val_values = _series(val, "loss")
    if val_steps:
        loss.plot(val_steps, val_values, "o-", color=COLOURS[1], label="validation")
    loss.set_title("loss")
    loss.legend()
    for axes, key, label, scale in (
        (rate, "lr", "learning rate", 1.0),
        (speed, "tokens_per_s", "tokens/s", 1.0),
        (mfu, "mfu", "MFU (% of the measured peak)", 100.0),
    ):
        steps, values = _series(train, key)
        if not steps or not any(values):
            _empty(axes, f"{label}: not measured in this run")
        else:
            axes.plot(steps, [v * scale for v in values], _style(len(steps)), color=COLOURS[0])
        axes.set_title(label)
    for axes in (speed, mfu):
        axes.set_xlabel("step")
    return to_png(figure)


def bar_panels(
    panels: Sequence[tuple[str, dict[str, float]]], title: str, muted: Sequence[str] = ()
) -> bytes:
    """One horizontal bar chart per (panel title, {name: value}), side by side, values printed at the bars;
    the bars named in `muted` are grey (the source model among its compressed versions)."""
    tallest = max((len(values) for _, values in panels), default=1)
    figure = _figure(max(2.2, 0.9 + 0.32 * tallest))
    figure.suptitle(title)
    axes_list = figure.subplots(1, len(panels), squeeze=False)[0]
    for axes, (panel_title, values) in zip(axes_list, panels):
        axes.set_title(panel_title)
        if not values:
            _empty(axes, "none")
            continue
        names = list(values)[::-1]  # the first entry on top
        numbers = [float(values[name]) for name in names]
        colours = [MUTED if name in muted else COLOURS[0] for name in names]
        bars = axes.barh(range(len(names)), numbers, color=colours)
        axes.set_yticks(range(len(names)), [_shorten(name) for name in names])
        axes.bar_label(bars, labels=[f"{n:,.4g}" for n in numbers], padding=3, fontsize=8)
        axes.margins(x=0.25)
        axes.tick_params(axis="y", labelsize=8)
    return to_png(figure)


def grouped_bars(
    categories: Sequence[str], series: dict[str, Sequence[float]], title: str, ylabel: str
) -> bytes:
    """Vertical bars per category, one colour per series (clean vs attacked, F1 per entity type); scores
    in [0, 1] keep that axis, so two plots of the same metric compare at a glance."""
    count = max(len(series), 1)
    figure = _figure(3.6, min(WIDTH, 3.0 + 0.9 * count * max(len(categories), 1)))
    axes = figure.subplots()
    width = 0.8 / count
    for index, (name, values) in enumerate(series.items()):
        positions = [c + (index - (count - 1) / 2) * width for c in range(len(categories))]
        bars = axes.bar(positions, values, width, label=name, color=COLOURS[index % len(COLOURS)])
        axes.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=2, fontsize=8)
    axes.set_xticks(range(len(categories)), categories, fontsize=8)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    top = max((v for values in series.values() for v in values), default=1.0)
    axes.set_ylim(0, 1.18 if top <= 1 else top * 1.18)
    if len(series) > 1:
        axes.legend(loc="upper right", ncols=len(series), fontsize=8)
    return to_png(figure)


def confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str], title: str) -> bytes:
    """The confusion matrix drawn as `llmk evaluate` draws it, for an eval.json whose PNG is absent."""
    from llmkernel.tasks.report import plot_confusion_matrix

    with tempfile.TemporaryDirectory(prefix="llmk-report-") as folder:
        path = plot_confusion_matrix(matrix, labels, Path(folder) / "confusion_matrix.png", title)
        return path.read_bytes()
