"""What every compression command does before and after its own work: check the inputs (source folder,
eval and calibration files, an output that is not the source), the up-to-date check, and the end: the new
folder written through a staging folder with compress.json and run.json, so the source is never touched
and an interrupted run leaves nothing that looks complete."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkernel import tasks
from llmkernel.compress.config import RUN_ONLY_FIELDS
from llmkernel.compress.measure import write_compress_json
from llmkernel.config import to_dict
from llmkernel.errors import ConfigError, InputError
from llmkernel.models.loading import model_kind, resolve_model
from llmkernel.runs import Manifest, describe_inputs, fingerprint, is_up_to_date, read_manifest

MODEL_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "adapter_model.safetensors")


@dataclass
class Job:
    """A compression run that has passed its checks: the resolved source and what run.json records."""

    stage: str
    config: Any
    source: Path
    kind: str
    out: Path
    inputs: list[dict[str, Any]]
    fingerprint: str
    started: float = field(default_factory=time.time)

    def finish(self, folder: Path, document: dict[str, Any], metrics: dict[str, Any]) -> None:
        """compress.json and run.json (last) into the staging `folder`."""
        write_compress_json(folder, {"stage": self.stage, "source_model": str(self.source), **document})
        Manifest(
            self.stage,
            to_dict(self.config),
            self.inputs,
            self.fingerprint,
            started_at=self.started,
            metrics=metrics,
        ).write(folder)


def open_job(stage: str, config: Any, model: str, files: list[str]) -> Job | None:
    """Check inputs first (files, then the model, then the output), or None when `--out` is up to date."""
    for path in files:
        if path and not Path(path).is_file():
            raise InputError(f"{path}: no such file")
    source = resolve_model(model)
    kind = model_kind(source)
    out = Path(config.out)
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise ConfigError(f"out: {out} is the source model's folder; write the result to a new folder")
    model_paths = [source / name for name in MODEL_FILES if (source / name).is_file()]
    inputs = describe_inputs([*(Path(p) for p in files if p), *model_paths])
    run_fingerprint = fingerprint(to_dict(config), inputs, RUN_ONLY_FIELDS)
    if not getattr(config, "force", False) and is_up_to_date(out, stage, run_fingerprint):
        print(f"{out} is up to date (same model, data and settings); --force runs it again")
        return None
    return Job(stage, config, source, kind, out, inputs, run_fingerprint)


def finished_metrics(out: Path) -> dict[str, Any]:
    return read_manifest(out).get("metrics", {})


def calibration_batches(model, tokenizer, kind: str, path: str, count: int) -> list:
    """Model inputs of the first `count` examples (or text windows) of `path`, read as the model's task."""
    task_class = tasks.task_for_model(kind, path)
    max_length = 128 if kind != "decoder" else 256
    task = task_class.for_evaluation(path, model, tokenizer, max_length, 16, {}, count)
    return task.calibration_batches(count)
