"""Classification metrics: accuracy, precision/recall/F1 per class and averaged, the confusion matrix.

Definitions follow scikit-learn's `precision_recall_fscore_support` called with every label listed
(`labels=range(len(labels))`) and `zero_division=0`: a class that is never predicted has precision 0.0, a
class with no true examples has recall 0.0, and every listed label counts in the macro average, even one
that never occurs. With one label per example, micro F1 equals accuracy.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmkernel.errors import InputError
from llmkernel.runs import atomic_write_bytes

LABEL_WIDTH = 12  # label names longer than this are cut in printed tables


def _check_ids(ids: np.ndarray, name: str, num_labels: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= num_labels):
        bad = int(ids[(ids < 0) | (ids >= num_labels)][0])
        raise InputError(
            f"label id {bad} in {name} is outside 0..{num_labels - 1} ({num_labels} labels); "
            "make the label list match the ids the data and the model use"
        )


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise numerator / denominator, 0.0 where the denominator is 0 (sklearn's zero_division=0)."""
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy, per-class and averaged precision/recall/F1, and the confusion matrix, as plain JSON types.

    Args:
        y_true: the true label id of each example; ids index into `labels`.
        y_pred: the predicted label id of each example.
        labels: the label names, one per id.

    Returns:
        {"accuracy", "macro_f1", "micro_f1", "weighted_f1", "macro_precision", "macro_recall",
        "num_examples", "labels", "per_class": {label: {"precision", "recall", "f1", "support"}},
        "confusion_matrix": rows = true label, columns = predicted label}.

    Raises:
        InputError: `y_true` and `y_pred` differ in length, `labels` is empty, or an id is out of range.
    """
    labels = [str(label) for label in labels]
    if not labels:
        raise InputError("the label list is empty; pass the class names, one per label id")
    if len(y_true) != len(y_pred):
        raise InputError(
            f"{len(y_true)} true labels but {len(y_pred)} predictions; evaluate one prediction per example"
        )
    num_labels = len(labels)
    true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    _check_ids(true, "y_true", num_labels)
    _check_ids(pred, "y_pred", num_labels)

    # confusion[t, p] = examples of true class t predicted as p; bincount over the flattened pair index
    confusion = np.bincount(true * num_labels + pred, minlength=num_labels * num_labels)
    confusion = confusion.reshape(num_labels, num_labels)
    true_positives = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)  # column sums: examples predicted as each class
    support = confusion.sum(axis=1)  # row sums: true examples of each class

    precision = _divide(true_positives, predicted)
    recall = _divide(true_positives, support.astype(np.float64))
    # 2tp / (2tp + fp + fn), the form sklearn uses; equal to the harmonic mean where both are defined
    f1 = _divide(2 * true_positives, predicted + support)

    num_examples = int(true.size)
    correct = float(true_positives.sum())
    accuracy = correct / num_examples if num_examples else 0.0
    # micro F1 = 2 * sum(tp) / (sum(predicted) + sum(support)) = accuracy when every prediction is a label
    micro_denominator = predicted.sum() + support.sum()
    micro_f1 = float(2 * correct / micro_denominator) if micro_denominator else 0.0
    weighted_f1 = float((f1 * support).sum() / support.sum()) if support.sum() else 0.0

    return {
        "accuracy": accuracy,
        "macro_f1": float(f1.mean()),
        "micro_f1": micro_f1,
        "weighted_f1": weighted_f1,
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "num_examples": num_examples,
        "labels": labels,
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion_matrix": confusion.astype(int).tolist(),
    }


def _short(name: str, width: int = LABEL_WIDTH) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


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

    def row(name: str, precision: float | str, recall: float | str, f1: float, support: int) -> str:
        cells = [
            f"{value:>9.4f}" if isinstance(value, float) else f"{value:>9}" for value in (precision, recall)
        ]
        return f"{name:>{width}}  {cells[0]}  {cells[1]}  {f1:>9.4f}  {support:>9}"

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
    lines += ["", "confusion matrix (rows: true, columns: predicted)"]
    lines.append(format_confusion_matrix(report["confusion_matrix"], report["labels"]))
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
    shares = _divide(counts.astype(np.float64), np.broadcast_to(row_totals, counts.shape).astype(np.float64))

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
