"""Reports: eval.json, the printed tables and the confusion-matrix plot, one writer for `llmk finetune`
and `llmk evaluate`. Each task formats its own table; the row and matrix formatters are shared here.

eval.json holds the task, the clean metrics at the top level and, under `attack`, the attack's settings and
the same report on the perturbed inputs, so clean and attacked numbers sit side by side.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmkernel.runs import atomic_write_bytes, atomic_write_json
from llmkernel.tasks.metrics import most_confused_pairs, safe_divide

LABEL_WIDTH = 12  # label names longer than this are cut in printed tables
MAX_MATRIX_LABELS = 12  # more labels: the printed report lists the most confused pairs instead of the matrix


def _short(name: str, width: int = LABEL_WIDTH) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def score_row(
    width: int, name: str, precision: float | str, recall: float | str, f1: float, support: int
) -> str:
    """One row of a precision / recall / F1 / support table (blank cells for strings)."""
    cells = [f"{value:>9.4f}" if isinstance(value, float) else f"{value:>9}" for value in (precision, recall)]
    return f"{name:>{width}}  {cells[0]}  {cells[1]}  {f1:>9.4f}  {support:>9}"


def format_confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    """The confusion matrix as a text table: one row per true label, one column per predicted label."""
    names = [_short(str(label)) for label in labels]
    corner = "true \\ pred"
    row_width = max(len(corner), *(len(name) for name in names))
    cell_width = max(*(len(name) for name in names), *(len(str(count)) for row in matrix for count in row))
    lines = [corner.ljust(row_width) + "".join(f"  {name:>{cell_width}}" for name in names)]
    for name, row in zip(names, matrix):
        lines.append(name.ljust(row_width) + "".join(f"  {count:>{cell_width}}" for count in row))
    return "\n".join(lines)


def format_classification_report(report: dict[str, Any]) -> str:
    """A table like sklearn's `classification_report`, then the confusion matrix with label names."""
    per_class = report["per_class"]
    names = {label: _short(label) for label in report["labels"]}
    width = max(len("weighted avg"), *(len(name) for name in names.values()))
    header = f"{'':>{width}}  {'precision':>9}  {'recall':>9}  {'f1-score':>9}  {'support':>9}"

    row = functools.partial(score_row, width)

    lines = [header, ""]
    for label, name in names.items():
        stats = per_class[label]
        lines.append(row(name, stats["precision"], stats["recall"], stats["f1"], stats["support"]))
    lines.append("")

    total = report["num_examples"]
    # weighted precision/recall are not stored in the report; recompute them from the per-class rows
    weighted = {
        key: sum(stats[key] * stats["support"] for stats in per_class.values()) / total if total else 0.0
        for key in ("precision", "recall")
    }
    lines.append(row("accuracy", "", "", report["accuracy"], total))
    lines.append(
        row("macro avg", report["macro_precision"], report["macro_recall"], report["macro_f1"], total)
    )
    lines.append(row("weighted avg", weighted["precision"], weighted["recall"], report["weighted_f1"], total))
    if len(report["labels"]) <= MAX_MATRIX_LABELS:
        lines += ["", "confusion matrix (rows: true, columns: predicted)"]
        lines.append(format_confusion_matrix(report["confusion_matrix"], report["labels"]))
    else:  # too wide to print: the pairs it would show, most errors first (the whole matrix is in eval.json)
        pairs = report.get("confused_pairs") or most_confused_pairs(
            report["confusion_matrix"], report["labels"]
        )
        lines += ["", "most confused pairs (true -> predicted: errors, share of the true label's examples)"]
        lines += [
            f"  {pair['true']} -> {pair['predicted']}: {pair['count']} ({pair['share']:.0%})"
            for pair in pairs
        ]
    return "\n".join(lines)


def format_entity_report(report: dict[str, Any]) -> str:
    """A seqeval-style table: one row per entity type, then the micro and macro averages."""
    per_type = report["per_type"]
    width = max(len("micro avg"), *(len(name) for name in per_type)) if per_type else len("micro avg")
    total = sum(stats["support"] for stats in per_type.values())

    row = functools.partial(score_row, width)

    lines = [f"{'':>{width}}  {'precision':>9}  {'recall':>9}  {'f1-score':>9}  {'support':>9}", ""]
    for name, stats in per_type.items():
        lines.append(row(name, stats["precision"], stats["recall"], stats["f1"], stats["support"]))
    lines.append("")
    lines.append(row("micro avg", report["precision"], report["recall"], report["f1"], total))
    lines.append(row("macro avg", "", "", report["macro_f1"], total))
    lines.append("")
    lines.append(f"token accuracy {report['token_accuracy']:.4f} over {report['num_sentences']} sentences")
    return "\n".join(lines)


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """Save the confusion matrix as a PNG: counts in the cells, colour = the count's share of its row.

    Colouring by row share (recall per class) keeps a rare class's mistakes visible next to a common one.

    Args:
        matrix: counts, rows = true label, columns = predicted label.
        labels: the label names, one per row/column.
        path: where to write the PNG; written atomically, its folder is created if missing.
        title: shown above the plot.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # a bare Figure: no pyplot global state to leak between calls

    counts = np.asarray(matrix, dtype=np.int64)
    num_labels = len(labels)
    if counts.shape != (num_labels, num_labels):
        raise ValueError(f"confusion matrix of shape {counts.shape} does not match {num_labels} labels")
    row_totals = counts.sum(axis=1, keepdims=True)
    shares = safe_divide(
        counts.astype(np.float64), np.broadcast_to(row_totals, counts.shape).astype(np.float64)
    )

    # ~0.6 inch per label, between 4 and 20 inches; the font shrinks as cells get smaller
    side = min(20.0, max(4.0, 1.5 + 0.6 * num_labels))
    font_size = max(5.0, min(10.0, 120.0 / max(num_labels, 1)))
    figure = Figure(figsize=(side + 1.0, side))
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true label's row")
    names = [_short(str(label)) for label in labels]
    axes.set_xticks(range(num_labels), names, rotation=45, ha="right", fontsize=font_size)
    axes.set_yticks(range(num_labels), names, fontsize=font_size)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if title:
        axes.set_title(title)
    for true_index in range(num_labels):
        for pred_index in range(num_labels):
            dark = shares[true_index, pred_index] > 0.5
            axes.text(
                pred_index,
                true_index,
                str(counts[true_index, pred_index]),
                ha="center",
                va="center",
                fontsize=font_size,
                color="white" if dark else "black",
            )
    figure.tight_layout()

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())  # temp file in the same folder, then os.replace
    return path


def format_headline(names: Sequence[str], report: dict[str, Any]) -> str:
    """One line per headline metric, then the sample replies if the report has them."""
    lines = [f"{name:>14}  {report[name]:.4f}" for name in names if name in report]
    for sample in report.get("samples", []):
        lines.append(f"\nprompt:    {sample['prompt'][:200]!r}\nreference: {sample['reference'][:200]!r}")
        lines.append(f"reply:     {sample['reply'][:200]!r}")
    return "\n".join(lines)


def format_comparison(
    names: Sequence[str], clean: dict[str, Any], attacked: dict[str, Any], attack: dict[str, Any]
) -> str:
    """Clean and attacked headline metrics side by side."""
    title = f"{attack['kind']} attack, rate {attack['rate']:g}, seed {attack['seed']}"
    lines = [f"{'metric':>14}  {'clean':>8}  {'attacked':>8}  {'change':>8}   ({title})"]
    for name in names:
        if name in clean and name in attacked:
            change = attacked[name] - clean[name]
            lines.append(f"{name:>14}  {clean[name]:8.4f}  {attacked[name]:8.4f}  {change:+8.4f}")
    return "\n".join(lines)


def save_report(
    out: str | Path,
    task: Any,
    report: dict[str, Any],
    title: str = "",
    attacked: dict[str, Any] | None = None,
    attack: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    echo: bool = True,
) -> dict[str, Any]:
    """Write eval.json (and the task's figures) into `out` and print the task's tables.

    `task` is the task object (llmkernel.tasks): its `name`, `headline`, `format_report` and `write_figures`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {"task": task.name, **(extra or {}), **report}
    task.write_figures(out, report, title)
    if attacked is not None and attack is not None:
        document["attack"] = {**attack, **attacked}
        task.write_figures(out, attacked, f"{title} ({attack['kind']} attack)", suffix="_attacked")
    atomic_write_json(out / "eval.json", document)
    if echo:
        print(task.format_report(report))
        if attacked is not None and attack is not None:
            print()
            print(format_comparison(task.headline, report, attacked, attack))
    return document
