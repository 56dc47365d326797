"""The data, training and configs sections: what `llmk prepare` kept and dropped, the training curves of
every run with a metrics.jsonl, and each stage's resolved config and wall time.

Each builder takes the runs (in pipeline order) and returns a Section, or None when no run has anything
for it, so the page only shows what the folders hold.
"""

from __future__ import annotations

import statistics
from typing import Any

import yaml

from llmkernel.report import plots
from llmkernel.report.collect import Run, training_records
from llmkernel.report.document import Code, Figure, Heading, Section, Table, Text, cell, megabytes

TOP_LANGUAGES = 12  # a web crawl has dozens; the page shows the commonest


# --------------------------------------------------------------------------------------------- data


def _data_summary(stats: dict[str, Any]) -> str:
    source, output = stats.get("input", {}), stats.get("output", {})
    tokens = ", ".join(f"{split} {count:,}" for split, count in (stats.get("tokens") or {}).items())
    return (
        f"Read {source.get('files', 0):,} files: {source.get('documents', 0):,} documents, "
        f"{cell(megabytes(source.get('bytes', 0)))} MB. Kept {output.get('documents', 0):,} documents "
        f"({cell(megabytes(output.get('bytes', 0)))} MB); tokens: {tokens or 'not packed'}; vocabulary "
        f"{(stats.get('tokenizer') or {}).get('vocab_size', 0):,}. {stats.get('duplicate_clusters', 0):,} "
        f"duplicate clusters (one document kept from each), {stats.get('documents_with_pii', 0):,} kept "
        f"documents with PII masked. {cell(stats.get('wall_seconds'))} s wall, "
        f"{cell(stats.get('mb_per_s'))} MB/s end to end."
    )


def _steps_table(stats: dict[str, Any]) -> Table:
    rows = [
        [
            name,
            step.get("documents_in"),
            step.get("documents_out"),
            megabytes(step.get("bytes_in")),
            megabytes(step.get("bytes_out")),
            step.get("seconds"),
        ]
        for name, step in (stats.get("steps") or {}).items()
    ]
    return Table(["step", "documents in", "documents out", "MB in", "MB out", "seconds"], rows)


def _prepare_blocks(run: Run, stats: dict[str, Any]) -> list:
    kept = {"kept": (stats.get("output") or {}).get("documents", 0), **(stats.get("dropped") or {})}
    languages = dict(list((stats.get("languages") or {}).items())[:TOP_LANGUAGES])
    pii = stats.get("pii_masked") or {}
    figure = plots.bar_panels(
        [
            ("documents kept and dropped by reason", kept),
            ("kept documents by language", languages),
            ("PII spans masked, by type", pii),
        ],
        run.short,
    )
    alt = (
        f"Bar charts of {run.label}: documents kept ({kept['kept']}) and dropped by reason, kept documents "
        f"by language and PII spans masked by type"
    )
    return [
        Heading(run.label),
        Text(_data_summary(stats)),
        Figure(f"{run.short}-data", figure, alt),
        _steps_table(stats),
        Table(["kept or dropped (reason)", "documents"], [[k, v] for k, v in kept.items()]),
        Table(["language", "kept documents"], [[k, v] for k, v in languages.items()]),
        Table(["PII type", "spans masked"], [[k, v] for k, v in pii.items()] or [["none found", 0]]),
    ]


def data_section(runs: list[Run]) -> Section | None:
    blocks = []
    for run in runs:
        stats = run.read_json("stats.json")
        if stats is not None:
            blocks += _prepare_blocks(run, stats)
    if not blocks:
        return None
    return Section(
        "data",
        "Data preparation",
        "What `llmk prepare` read, kept and dropped (stats.json): every step's documents and bytes, "
        "drops by reason, languages, PII by type and duplicate clusters.",
        blocks,
    )


# ----------------------------------------------------------------------------------------- training


def _median(records: list[dict[str, Any]], key: str) -> float | None:
    # The first logged window holds the warm-up (and any compiling), so it is left out when there are more.
    values = [r[key] for r in records[1:] or records if isinstance(r.get(key), int | float)]
    return statistics.median(values) if values else None


def _training_summary(run: Run, train: list[dict[str, Any]], val: list[dict[str, Any]]) -> Table:
    metrics = run.metrics
    mfu = _median(train, "mfu")
    rows: list[list[Any]] = [
        ["optimizer steps", train[-1]["step"] if train else metrics.get("step")],
        ["tokens seen", train[-1].get("tokens") if train else metrics.get("tokens_seen")],
        ["last train loss", train[-1].get("loss") if train else metrics.get("train_loss")],
        ["median tokens/s", _median(train, "tokens_per_s")],
        ["median samples/s", _median(train, "samples_per_s")],
        ["median MFU (%)", 100 * mfu if mfu else None],
        ["parameters", metrics.get("parameters")],
        ["stopped by", metrics.get("stopped_by") or "max steps"],
    ]
    if "best_step" in metrics:
        rows.insert(3, ["best evaluation at step", metrics["best_step"]])
    for key, value in (val[-1] if val else {}).items():
        if key not in ("step", "split"):
            rows.append([f"last validation {key}", value])
    return Table(["", "value"], rows)


def _validation_table(val: list[dict[str, Any]]) -> Table:
    keys = [k for k in val[0] if k not in ("step", "split")]
    return Table(["step", *keys], [[record["step"], *(record.get(k) for k in keys)] for record in val])


def training_section(runs: list[Run]) -> Section | None:
    blocks = []
    for run in runs:
        records = training_records(run)
        train, val = records.get("train", []), records.get("val", [])
        if not train and not val:
            continue
        curves = plots.training_curves(train, val, run.short)
        alt = f"Training curves of {run.label}: loss, learning rate, tokens/s and MFU over {len(train)} logged steps"
        blocks += [
            Heading(run.label),
            _training_summary(run, train, val),
            Figure(f"{run.short}-curves", curves, alt),
        ]
        if val:
            blocks += [Text("Evaluations during training:"), _validation_table(val)]
    if not blocks:
        return None
    return Section(
        "training",
        "Training",
        "Loss and learning-rate curves, throughput and MFU of every run with a metrics.jsonl (pretraining, "
        "fine-tuning, distillation, pruning with recovery).",
        blocks,
    )


# ------------------------------------------------------------------------------------------ configs


def _runs_table(runs: list[Run]) -> Table:
    rows = [
        [
            run.stage,
            str(run.folder),
            run.manifest.get("version"),
            str(run.manifest.get("finished_at") or "")[:19].replace("T", " "),
            run.wall_time_s,
            len(run.manifest.get("inputs") or []),
            len(run.manifest.get("outputs") or []),
        ]
        for run in runs
    ]
    return Table(["stage", "folder", "version", "finished (UTC)", "wall time (s)", "inputs", "outputs"], rows)


def configs_section(runs: list[Run]) -> Section:
    """Every run: its resolved config (run.json's, what `--config` takes back) and its wall time."""
    times = {run.short: run.wall_time_s for run in runs if run.wall_time_s is not None}
    blocks: list = [_runs_table(runs)]
    if times:
        figure = plots.bar_panels([("wall time (s)", times)], "wall time of each run")
        alt = "Bar chart of the wall time of each run: " + ", ".join(
            f"{k} {v:.1f} s" for k, v in times.items()
        )
        blocks.append(Figure("wall-time", figure, alt))
    for run in runs:
        text = yaml.safe_dump(run.config, sort_keys=False, allow_unicode=True, default_flow_style=False)
        blocks.append(Code(text.rstrip(), summary=f"{run.label}: resolved config"))
    return Section(
        "configs",
        "Configs and wall time",
        "Each stage's resolved config as run.json records it (give it back with `--config`) and its wall time.",
        blocks,
    )
