"""eval.json, the printed tables and the confusion-matrix plot: one writer for `llmk finetune` and `llmk evaluate`.

eval.json holds the task, the clean metrics at the top level (the full classification or entity report,
or perplexity and bits per byte) and, under `attack`, the attack's settings and the same report on the
perturbed inputs, so clean and attacked numbers sit side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkernel.eval.classification import format_classification_report, plot_confusion_matrix
from llmkernel.eval.entities import format_entity_report
from llmkernel.runs import atomic_write_json

# the metrics shown side by side for clean and attacked inputs
HEADLINE = {
    "classify": ("accuracy", "macro_f1", "weighted_f1"),
    "ner": ("f1", "precision", "recall", "token_accuracy"),
    "lm": ("loss", "perplexity", "bits_per_byte"),
    "sft": ("loss", "perplexity"),
}


def format_report(task: str, report: dict[str, Any]) -> str:
    """The task's printed table."""
    if task == "classify":
        return format_classification_report(report)
    if task == "ner":
        return format_entity_report(report)
    lines = [f"{name:>14}  {report[name]:.4f}" for name in HEADLINE[task] if name in report]
    for sample in report.get("samples", []):
        lines.append(f"\nprompt:    {sample['prompt'][:200]!r}\nreference: {sample['reference'][:200]!r}")
        lines.append(f"reply:     {sample['reply'][:200]!r}")
    return "\n".join(lines)


def format_comparison(
    task: str, clean: dict[str, Any], attacked: dict[str, Any], attack: dict[str, Any]
) -> str:
    """Clean and attacked headline metrics side by side."""
    title = f"{attack['kind']} attack, rate {attack['rate']:g}, seed {attack['seed']}"
    lines = [f"{'metric':>14}  {'clean':>8}  {'attacked':>8}  {'change':>8}   ({title})"]
    for name in HEADLINE[task]:
        if name in clean and name in attacked:
            change = attacked[name] - clean[name]
            lines.append(f"{name:>14}  {clean[name]:8.4f}  {attacked[name]:8.4f}  {change:+8.4f}")
    return "\n".join(lines)


def save_report(
    out: str | Path,
    task: str,
    report: dict[str, Any],
    title: str = "",
    attacked: dict[str, Any] | None = None,
    attack: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    echo: bool = True,
) -> dict[str, Any]:
    """Write eval.json (and confusion_matrix.png for classification) into `out`, print the tables."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {"task": task, **(extra or {}), **report}
    if attacked is not None and attack is not None:
        document["attack"] = {**attack, **attacked}
    if task == "classify":
        plot_confusion_matrix(
            report["confusion_matrix"], report["labels"], out / "confusion_matrix.png", title
        )
        if attacked is not None:
            plot_confusion_matrix(
                attacked["confusion_matrix"],
                attacked["labels"],
                out / "confusion_matrix_attacked.png",
                f"{title} ({attack['kind']} attack)",
            )
    atomic_write_json(out / "eval.json", document)
    if echo:
        print(format_report(task, report))
        if attacked is not None and attack is not None:
            print()
            print(format_comparison(task, report, attacked, attack))
    return document
