"""The evaluation and compression sections: eval.json of every run that wrote one (metrics, clean vs
attacked, per-class scores and the confusion matrix, entity F1 by type) and compress.json of every
compression run (size, latency and the task metric of the source and of each result, and the gates).

What is shown follows what the report holds (`per_class`, `per_type`, `attack`), not the task's name, so
a new task's eval.json shows its metrics without a change here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkernel.report import plots
from llmkernel.report.collect import Run
from llmkernel.report.document import Figure, Heading, Section, Table, Text, cell, megabytes
from llmkernel.tasks.metrics import most_confused_pairs
from llmkernel.tasks.report import MAX_MATRIX_LABELS

SCORES = ("precision", "recall", "f1", "support")


# ------------------------------------------------------------------------------------------ evaluation


def headline_metrics(report: dict[str, Any]) -> list[str]:
    """The report's top-level numbers (counts such as num_examples are context, not metrics)."""
    return [
        key
        for key, value in report.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and not key.startswith("num_")
    ]


def _metrics_table(report: dict[str, Any], attacked: dict[str, Any] | None) -> Table:
    names = headline_metrics(report)
    if attacked is None:
        return Table(["metric", "value"], [[name, report[name]] for name in names])
    rows = []
    for name in names:
        after = attacked.get(name)
        change = after - report[name] if isinstance(after, int | float) else None
        rows.append([name, report[name], after, f"{change:+.4f}" if change is not None else None])
    return Table(["metric", "clean", "attacked", "change"], rows)


def _scores_table(title: str, scores: dict[str, Any], attacked: dict[str, Any] | None) -> Table:
    headers = [title, *SCORES] + (["attacked f1"] if attacked is not None else [])
    rows = []
    for name, values in scores.items():
        row = [name, *(values.get(key) for key in SCORES)]
        if attacked is not None:
            row.append((attacked.get(name) or {}).get("f1"))
        rows.append(row)
    return Table(headers, rows)


def _confusion(run: Run, report: dict[str, Any], suffix: str, title: str) -> list:
    labels, matrix = report["labels"], report["confusion_matrix"]
    png = f"confusion_matrix{suffix}.png"
    image = (run.folder / png).read_bytes() if run.has(png) else plots.confusion_matrix(matrix, labels, title)
    alt = f"Confusion matrix{' under attack' if suffix else ''} of {run.label}: rows true, columns predicted"
    figure = Figure(f"{run.short}-confusion{suffix}", image, alt)
    if len(labels) > MAX_MATRIX_LABELS:  # a 77 x 77 table says nothing: the pairs most often confused
        pairs = most_confused_pairs(matrix, labels)
        rows = [[p["true"], p["predicted"], p["count"], p["share"]] for p in pairs]
        table = Table(["true", "predicted as", "errors", "share of true"], rows)
        return [Text(f"Most confused pairs ({title}), of {len(labels)} labels:"), table, figure]
    table = Table(["true \\ predicted", *labels], [[label, *row] for label, row in zip(labels, matrix)])
    return [Text(f"Confusion matrix ({title}):"), table, figure]


def _comparison_figure(run: Run, report: dict[str, Any], attacked: dict[str, Any], kind: str) -> Figure:
    # Scores in [0, 1] share one axis; a loss or perplexity would flatten them.
    names = [n for n in headline_metrics(report) if 0 <= report[n] <= 1 and n in attacked and "loss" not in n]
    png = plots.grouped_bars(
        names,
        {"clean": [report[n] for n in names], "attacked": [attacked[n] for n in names]},
        f"{run.short}: clean vs {kind} attack",
        "score",
    )
    alt = f"Bar chart of clean and attacked metrics of {run.label}: " + ", ".join(
        f"{n} {report[n]:.3f} vs {attacked[n]:.3f}" for n in names
    )
    return Figure(f"{run.short}-attack", png, alt)


def _entity_figure(run: Run, per_type: dict[str, Any], attacked: dict[str, Any] | None) -> Figure:
    types = list(per_type)
    series = {"clean": [per_type[t]["f1"] for t in types]}
    if attacked is not None:
        series["attacked"] = [(attacked.get(t) or {}).get("f1", 0.0) for t in types]
    png = plots.grouped_bars(types, series, f"{run.short}: entity F1 by type", "F1")
    alt = f"Bar chart of entity F1 by type of {run.label}: " + ", ".join(
        f"{t} {per_type[t]['f1']:.3f}" for t in types
    )
    return Figure(f"{run.short}-entities", png, alt)


def _source_line(run: Run, report: dict[str, Any]) -> str:
    model = report.get("model") or run.config.get("model") or run.config.get("student") or run.folder
    section = run.config.get("data")  # a file (evaluate) or a section with the eval file (finetune)
    data = report.get("data") or (section.get("eval") if isinstance(section, dict) else section)
    data = data or "the run's evaluation set"
    count = report.get("num_examples") or report.get("num_sentences")
    examples = f", {count:,} examples" if isinstance(count, int) else ""
    return f"Task {report.get('task', '?')}: model {model} on {data}{examples}."


def _evaluation_blocks(run: Run, report: dict[str, Any]) -> list:
    attack = report.get("attack") if isinstance(report.get("attack"), dict) else None
    blocks: list = [Heading(run.label), Text(_source_line(run, report))]
    if attack is not None:
        blocks.append(
            Text(f"Attack: {attack.get('kind')} at rate {attack.get('rate')}, seed {attack.get('seed')}.")
        )
        blocks.append(_comparison_figure(run, report, attack, str(attack.get("kind"))))
    blocks.append(_metrics_table(report, attack))
    if isinstance(report.get("per_class"), dict):
        blocks.append(_scores_table("label", report["per_class"], (attack or {}).get("per_class")))
    if isinstance(report.get("per_type"), dict) and report["per_type"]:
        attacked_types = (attack or {}).get("per_type")
        blocks += [_scores_table("entity type", report["per_type"], attacked_types)]
        blocks.append(_entity_figure(run, report["per_type"], attacked_types))
    if "confusion_matrix" in report and "labels" in report:
        blocks += _confusion(run, report, "", "clean")
        if attack is not None and "confusion_matrix" in attack:
            blocks += _confusion(run, {**report, **attack}, "_attacked", f"{attack.get('kind')} attack")
    return blocks


def evaluation_section(runs: list[Run]) -> Section | None:
    blocks = []
    for run in runs:
        report = run.read_json("eval.json")
        if report is not None:
            blocks += _evaluation_blocks(run, report)
    if not blocks:
        return None
    return Section(
        "evaluation",
        "Evaluation",
        "eval.json of every run that wrote one (`llmk evaluate`, and fine-tuning's best weights on its "
        "evaluation set): metrics, clean vs attacked, per-class scores, the confusion matrix, entity F1 by type.",
        blocks,
    )


# ----------------------------------------------------------------------------------------- compression

METHOD_DETAILS = ("bits", "group_size", "static", "criterion", "scope", "ffn", "heads", "dropped_layers")


def method_label(run: Run, document: dict[str, Any]) -> str:
    """What the compression did, in a few words: 'int8', 'weight_only bits 4 group_size 32', 'onnx f32'."""
    method = document.get("method")
    if isinstance(method, dict):
        details = [
            f"{k} {method[k]}" for k in METHOD_DETAILS if k in method and method[k] not in (None, False)
        ]
        if method.get("recovery_steps"):
            details.append(f"recovered {method['recovery_steps']} steps")
        return " ".join([str(method.get("method", run.stage)), *details])
    if "format" in document:
        return f"{document['format']} {document.get('dtype', '')}".strip()
    return run.stage


def _latency_ms(side: dict[str, Any]) -> float | None:
    """Milliseconds per fixed batch (encoders) or per generated token (decoders: single stream)."""
    if isinstance(side.get("latency_ms"), int | float):
        return side["latency_ms"]
    if isinstance(side.get("tokens_per_s"), int | float) and side["tokens_per_s"]:
        return 1000 / side["tokens_per_s"]
    return None


def _row(
    name: str, method: str, side: dict[str, Any], metric: str, comparison: dict[str, Any], gates: str
) -> list:
    return [
        name,
        method,
        side.get("parameters"),
        megabytes(side.get("bytes_on_disk")),
        megabytes(side.get("linear_weight_bytes")),
        _latency_ms(side),
        metric,
        (side.get("metrics") or {}).get(metric) if metric else None,
        comparison.get("speedup"),
        comparison.get("metric_drop"),
        gates,
    ]


def _gates_text(document: dict[str, Any]) -> str:
    gates = [
        f"{g.get('name')} {cell(g.get('value'))} (limit {cell(g.get('limit'))}): {'passed' if g.get('passed') else 'MISSED'}"
        for g in document.get("gates") or []
    ]
    check = document.get("check") if isinstance(document.get("check"), dict) else {}
    gates += [f"{k} {cell(v)}" for k, v in check.items() if isinstance(v, bool | int | float)]
    return "; ".join(gates)


def _compression_groups(runs: list[Run]) -> tuple[dict[str, list[list[Any]]], list[str]]:
    """Table rows grouped by source model (its own row first, then each result made from it), and notes."""
    groups: dict[str, list[list[Any]]] = {}
    notes = []
    for run in runs:
        document = run.read_json("compress.json")
        if document is None:
            continue
        comparison = document.get("comparison") or {}
        metric = str(comparison.get("metric") or "")
        source, result = dict(document.get("source") or {}), dict(document.get("result") or {})
        if isinstance(document.get("bytes_on_disk"), dict):  # export: bytes of each side only
            source["bytes_on_disk"] = document["bytes_on_disk"].get("source")
            result["bytes_on_disk"] = document["bytes_on_disk"].get("result")
        source_path = str(document.get("source_model") or run.config.get("model") or "")
        if source_path not in groups:
            groups[source_path] = [_row(f"source · {Path(source_path).name}", "none", source, metric, {}, "")]
        elif metric and groups[source_path][0][7] is None:  # an export came first: no metric measured
            groups[source_path][0] = _row(
                f"source · {Path(source_path).name}", "none", source, metric, {}, ""
            )
        groups[source_path].append(
            _row(run.short, method_label(run, document), result, metric, comparison, _gates_text(document))
        )
        notes += [f"{run.short}: {note}" for note in document.get("notes") or []]
    return groups, notes


def _tradeoff_figure(source_path: str, rows: list[list[Any]]) -> Figure:
    """Size, latency and the task metric of one source model and what each method made of it."""
    names = [row[0] for row in rows]  # the table below names each method in full
    metric = next((str(row[6]) for row in rows if row[6]), "task metric")
    panels = [
        ("MB on disk", {n: r[3] for n, r in zip(names, rows) if r[3] is not None}),
        ("latency (ms)", {n: r[5] for n, r in zip(names, rows) if r[5] is not None}),
        (metric, {n: r[7] for n, r in zip(names, rows) if r[7] is not None}),
    ]
    title = f"compression of {Path(source_path).name}: size, latency and {metric} per method"
    png = plots.bar_panels(panels, title, muted=[names[0]])
    alt = f"Bar charts of size on disk, latency and {metric} of {source_path} (grey) and of " + ", ".join(
        f"{row[0]} ({row[1]})" for row in rows[1:]
    )
    return Figure(f"compression-{Path(source_path).name}", png, alt)


def compression_section(runs: list[Run]) -> Section | None:
    groups, notes = _compression_groups(runs)
    if not groups:
        return None
    headers = [
        "model", "method", "parameters", "MB on disk", "Linear MB",
        "latency (ms)", "metric", "value", "speed-up", "metric change", "gates and checks",
    ]  # fmt: skip
    blocks: list = [_tradeoff_figure(source, rows) for source, rows in groups.items()]
    blocks.append(Table(headers, [row for rows in groups.values() for row in rows]))
    blocks += [Text(note) for note in notes]
    return Section(
        "compression",
        "Compression",
        "compress.json of every prune, distill, quantize and export run: the source and the result side by "
        "side. Latency: milliseconds per fixed batch for encoders, per generated token for decoders (single "
        "stream). Metric change: points lost for accuracy and F1, relative increase for perplexity.",
        blocks,
    )
