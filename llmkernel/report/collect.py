"""Reading run folders: which folders are runs, in pipeline order, and the files each stage wrote there.

A run folder is any folder with a `run.json` (what every stage writes last). The report is given run
folders or a parent (a recipe's output folder) and finds the runs under it. It reads what the stages
wrote and never imports them: stats.json (prepare), metrics.jsonl (every training stage), eval.json
(finetune, evaluate, distill), compress.json (prune, quantize, distill, export), tb/ for the samples a
pretraining logged, and the model folder itself for the report's own sample continuations.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkernel.errors import InputError
from llmkernel.runs import MANIFEST
from llmkernel.stages import STAGES

# Folders inside runs that hold no runs of their own (checkpoints can be many): never searched.
NOT_SEARCHED = {"checkpoints", "tb", "report_files"}
STAGE_ORDER = {entry.name: index for index, entry in enumerate(STAGES)}


@dataclass
class Run:
    """One finished run folder and its run.json."""

    folder: Path
    manifest: dict[str, Any]

    @property
    def stage(self) -> str:
        return str(self.manifest.get("stage", "unknown"))

    @property
    def label(self) -> str:
        """How the page names the run: the stage and the folder as the user gave it."""
        return f"{self.stage} · {self.folder}"

    @property
    def short(self) -> str:
        """The stage and the folder's own name: what fits on a plot's axis."""
        return f"{self.stage} · {self.folder.name}"

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.get("config") or {}

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics") or {}

    @property
    def wall_time_s(self) -> float | None:
        value = self.manifest.get("wall_time_s")
        return float(value) if isinstance(value, int | float) else None

    def has(self, name: str) -> bool:
        return (self.folder / name).is_file()

    def read_json(self, name: str) -> dict[str, Any] | None:
        """A JSON file the stage wrote into the folder; None when it wrote none."""
        path = self.folder / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InputError(f"{path}: not valid JSON ({error}); run that stage again with --force") from None


def training_records(run: Run) -> dict[str, list[dict[str, Any]]]:
    """metrics.jsonl by split ('train', 'val'), sorted by step, one record per step.

    A resumed run appends the steps between its last checkpoint and the interruption a second time, so
    the last record of a step wins; a line cut short by a kill is skipped.
    """
    path = run.folder / "metrics.jsonl"
    by_split: dict[str, dict[int, dict[str, Any]]] = {}
    if not path.is_file():
        return {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            by_split.setdefault(str(record.get("split", "train")), {})[record["step"]] = record
    return {split: [steps[s] for s in sorted(steps)] for split, steps in by_split.items()}


def model_architecture(run: Run) -> str:
    """The first architecture in the folder's config.json ('' when the run wrote no model)."""
    path = run.folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return ""
    return ((config.get("architectures") or [""]) if isinstance(config, dict) else [""])[0] or ""


def _run_folders_under(root: Path) -> Iterator[Path]:
    """Every folder under `root` with a run.json, skipping hidden folders (staging folders of runs in
    progress are `.NAME.partial-PID`) and the bulky folders inside runs."""
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(s for s in subfolders if not s.startswith(".") and s not in NOT_SEARCHED)
        if MANIFEST in files:
            yield Path(folder)


def _load(folder: Path) -> Run:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error}); run that stage again with --force") from None
    if not isinstance(manifest, dict) or "stage" not in manifest:
        raise InputError(f"{path}: not a run manifest of llmk (no 'stage'); give the --out folder of a stage")
    return Run(folder, manifest)


def find_runs(paths: Sequence[str | Path]) -> list[Run]:
    """The runs of `paths` (run folders, or folders holding run folders), in pipeline order.

    Runs of the same stage keep the order they were given or found in (found: by folder name).

    Raises:
        InputError: a path is not a folder, or neither it nor any folder under it holds a run.json.
    """
    runs: dict[Path, Run] = {}
    for given in paths:
        folder = Path(given)
        if not folder.is_dir():
            raise InputError(
                f"{folder}: no such folder; give run folders (each with run.json) or a recipe's output folder"
            )
        found = [folder] if (folder / MANIFEST).is_file() else list(_run_folders_under(folder))
        if not found:
            raise InputError(
                f"{folder} is not a run folder: no run.json in it or in any folder under it; give the --out "
                "folder of an llmk stage (an unfinished run writes run.json last: finish it with --resume)"
            )
        for run_folder in found:
            runs.setdefault(run_folder.resolve(), _load(run_folder))
    return sorted(runs.values(), key=lambda run: STAGE_ORDER.get(run.stage, len(STAGE_ORDER)))
