"""`llmk run RECIPE.yaml`: chain the stages, each reading the folder an earlier one wrote, then write the report.

A recipe has one section per stage; each section holds that stage's config fields, and the sections run in
the order of `stages.py` (prepare, pretrain, finetune, evaluate, prune, distill, quantize, export, serve),
whatever their order in the file. How a recipe is read:

* **Chaining.** A section that names no input takes the latest output an earlier section wrote of the kind
  its stage reads (`Stage.takes`/`accepts`): pretrain reads prepare's data; finetune, evaluate, prune,
  distill (its teacher), quantize and export read the latest model; serve the latest model or quantized one.
  Evaluate and the compression stages' `measure.eval` default to the finetune section's evaluation file.
* **Paths.** A relative input path is looked up in the working directory, then beside the recipe file.
  Outputs are relative to the working directory; with `--out DIR` every stage's folder goes under DIR (named
  by its section's `out`, or by the stage), and inputs that named an earlier section's `out` follow it.
* **Running.** Every section is validated before any stage runs. A stage whose config and inputs are
  unchanged skips (its own check); `--force` runs it again; `--from`/`--until` run a range, the stages
  before it being read from their folders. A failing stage stops the chain with its one-line error; a stage
  stopped by Ctrl-C/SIGTERM stops it too, and `llmk run --resume` continues that stage from its checkpoint.
* **Serve** in a recipe starts the server, checks `/ready` and one request per route, and stops it
  (`--serve-forever` keeps it up). At the end `llmk report` runs over every folder the recipe wrote.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkernel.config import build, field_default, load_yaml
from llmkernel.errors import ConfigError, InputError, UserError
from llmkernel.runs import MANIFEST, read_manifest
from llmkernel.stages import RECIPE_STAGES, STAGES, stage

REPORT_FOLDER = "report"  # where `llmk run` writes the report: beside the stage folders


@dataclass
class Options:
    """The options of `llmk run` (and `llmk demo`)."""

    force: bool = False
    resume: bool = False
    start: str = ""  # --from: first stage to run ('': the first section)
    until: str = ""  # --until: last stage to run ('': the last section)
    out: str = ""  # --out: every stage's folder under it ('': as the sections say)
    serve_forever: bool = False
    report: bool = True
    title: str = ""  # of the report ('': from the folders' names)


@dataclass
class Step:
    """One section of a recipe, resolved: its stage, config and output folder, and whether it runs now."""

    name: str
    config: Any
    out: str  # the folder it writes ('' for serve)
    runs: bool = True
    metrics: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- reading a recipe


def check_sections(recipe: dict[str, Any]) -> None:
    """Every section of `recipe` names a stage that a recipe chains, and there is at least one."""
    known = ", ".join(RECIPE_STAGES)
    for name in recipe:
        if name in RECIPE_STAGES:
            continue
        if name in {entry.name for entry in STAGES}:
            raise ConfigError(
                f"recipe section '{name}': `llmk run` does not chain {name}; run `llmk {name} --config RECIPE` "
                f"after it (a recipe chains {known})"
            )
        raise ConfigError(f"unknown recipe section '{name}'; known stages: {known}")
    if not recipe:
        raise ConfigError(f"the recipe has no stage sections; add one of: {known}")
    for name, section in recipe.items():
        if not isinstance(section, dict):
            raise ConfigError(f"{name}: expected a mapping of config fields")


def resolve_paths(recipe: dict[str, Any], base: Path | None, out: str) -> dict[str, Any]:
    """`recipe` with its outputs placed (under `out` if given) and relative inputs found (cwd, then `base`)."""
    recipe = copy.deepcopy(recipe)
    moved: dict[str, str] = {}  # an out a section named -> where it goes now
    for name in _ordered(recipe):
        section = recipe[name]
        out_field = {f.name: f for f in dataclasses.fields(stage(name).config_class())}.get("out")
        if out_field is None:
            continue
        named = section.get("out")
        if out:
            section["out"] = str(Path(out) / (Path(named).name if named else name))
            if named:
                moved[os.path.normpath(named)] = section["out"]
        elif not named:
            section["out"] = str(field_default(out_field))

    def place(value: Any, key: str) -> Any:
        if isinstance(value, dict):
            return {k: place(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [place(v, key) for v in value]
        if (
            not isinstance(value, str)
            or key == "out"
            or not value
            or ":" in value
            or Path(value).is_absolute()
        ):
            return value
        if os.path.normpath(value) in moved:
            return moved[os.path.normpath(value)]
        if base is not None and not Path(value).exists() and (base / value).exists():
            return str(base / value)
        return value

    return {name: place(section, name) for name, section in recipe.items()}


def _ordered(recipe: dict[str, Any]) -> list[str]:
    return [name for name in RECIPE_STAGES if name in recipe]


def chain(recipe: dict[str, Any]) -> dict[str, Any]:
    """Fill each section's input from an earlier section's output where the section names none."""
    recipe = copy.deepcopy(recipe)
    latest: list[tuple[str, str]] = []  # (kind, folder) in the order they were written
    finetune = recipe.get("finetune", {})
    eval_file = (finetune.get("data") or {}).get("eval", "")
    for name in _ordered(recipe):
        entry, section = stage(name), recipe[name]
        if entry.takes and not section.get(entry.takes):
            earlier = [folder for kind, folder in latest if kind in entry.accepts]
            if earlier:
                section[entry.takes] = earlier[-1]
        if eval_file:
            _fill_eval_file(name, section, eval_file, finetune)
        if entry.gives and section.get("out"):
            latest.append((entry.gives, section["out"]))
    return recipe


def _fill_eval_file(name: str, section: dict[str, Any], eval_file: str, finetune: dict[str, Any]) -> None:
    """Evaluate and the compression stages measure on the finetune section's evaluation file by default."""
    if name == "evaluate":
        section.setdefault("data", eval_file)
    elif name in ("prune", "quantize", "distill"):
        measure = section.setdefault("measure", {})
        if isinstance(measure, dict):
            measure.setdefault("eval", eval_file)
    if name == "distill":
        section.setdefault("task", finetune.get("task", ""))
        section.setdefault("data", copy.deepcopy(finetune.get("data", {})))


def stage_config(name: str, section: dict[str, Any], options: Options) -> Any:
    """The config of recipe section `name`, with `llmk run`'s --force (and --resume where it applies)."""
    config_class = stage(name).config_class()
    fields = {entry.name for entry in dataclasses.fields(config_class)}
    section = dict(section)
    if "force" in fields:
        section["force"] = options.force or section.get("force", False)
    if "resume" in fields and options.resume and _interrupted(section.get("out", "")):
        section["resume"], section["force"] = True, False
    return build(config_class, section, prefix=f"{name}.")


def _interrupted(out: str) -> bool:
    """An out folder holding checkpoints but no run.json: a training run that was stopped."""
    folder = Path(out)
    return bool(out) and (folder / "checkpoints").is_dir() and not (folder / MANIFEST).is_file()


def plan(
    recipe: dict[str, Any], options: Options, base: Path | None = None, check_files: bool = False
) -> list[Step]:
    """Every section resolved, chained and validated (a typo fails before hours of work), in pipeline order;
    with `check_files`, the input files of the stages to run too (`check_inputs`)."""
    check_sections(recipe)
    recipe = chain(resolve_paths(recipe, base, options.out))
    names = _ordered(recipe)
    for flag, value in (("--from", options.start), ("--until", options.until)):
        if value and value not in names:
            raise ConfigError(
                f"{flag} {value}: the recipe has no '{value}' section; it has {', '.join(names)}"
            )
    first = names.index(options.start) if options.start else 0
    last = names.index(options.until) if options.until else len(names) - 1
    if first > last:
        raise ConfigError(f"--from {options.start} comes after --until {options.until} in the pipeline order")
    steps = [
        Step(name, stage_config(name, recipe[name], options), recipe[name].get("out", ""), first <= i <= last)
        for i, name in enumerate(names)
    ]
    if check_files:
        outs = [recipe[name].get("out", "") for name in names[:last]]
        check_inputs(recipe, names[first : last + 1], outs)
    for step in steps[:first]:
        if step.out and read_manifest(step.out) is None:
            raise InputError(
                f"--from {options.start}: {step.name}'s folder {step.out} holds no finished run (no {MANIFEST}); "
                f"run the recipe without --from first"
            )
    return steps


FILE_SUFFIXES = (".jsonl", ".json", ".tsv", ".csv", ".txt", ".parquet", ".yaml", ".yml")


def check_inputs(recipe: dict[str, Any], names: list[str], outs: list[str]) -> None:
    """Every input file the sections `names` name exists, or lies in a folder a section writes: a missing
    file fails before the stages ahead of it run (not after an hour of pretraining). A value counts as a
    file when it names a folder (has a `/`) or ends with a data-file suffix; `builtin:` names are not."""
    written = [Path(out) for out in outs if out]

    def missing(value: Any, key: str) -> list[tuple[str, str]]:
        if isinstance(value, dict):
            return [m for k, v in value.items() if k != "out" for m in missing(v, f"{key}.{k}")]
        if isinstance(value, list):
            return [m for v in value for m in missing(v, key)]
        if not isinstance(value, str) or ":" in value or not value:
            return []
        if "/" not in value and not value.endswith(FILE_SUFFIXES):
            return []
        path = Path(value)
        if path.exists() or any(folder == path or folder in path.parents for folder in written):
            return []
        return [(key, value)]

    for name in names:
        for key, value in missing(recipe[name], name):
            raise InputError(
                f"{key}: {value} does not exist and no section of the recipe writes it; "
                "create it or fix the path (relative paths are looked up in the working directory, "
                "then beside the recipe)"
            )


# ------------------------------------------------------------------------------------------ running it


def run_stages(
    recipe: dict[str, Any], options: Options | None = None, base: Path | None = None
) -> list[Step]:
    """Run the recipe's sections in pipeline order; returns every step with the metrics its stage returned.

    A failing stage raises its UserError, prefixed with the stage's name, and the later stages do not run.
    A training stage stopped by Ctrl-C or SIGTERM checkpoints and returns; the chain stops there.
    """
    options = options or Options()
    steps = plan(recipe, options, base, check_files=True)
    chosen = [step for step in steps if step.runs]
    started = time.monotonic()
    for number, step in enumerate(chosen, 1):
        _announce(step, number, len(chosen), time.monotonic() - started)
        began = time.monotonic()
        try:
            extra = {"serve_forever": options.serve_forever} if step.name == "serve" else {}
            step.metrics = stage(step.name).run_in_recipe(step.config, **extra) or {}
        except UserError as error:
            raise type(error)(f"{step.name}: {error}") from None
        if not isinstance(step.metrics, dict):
            step.metrics = {}
        print(f"  {step.name} finished in {_clock(time.monotonic() - began)}\n")
        if stopped(step.metrics):
            later = [s.name for s in chosen[number:]]
            if later:
                print(f"{step.name} was stopped; not running {', '.join(later)} (continue with --resume)")
            return steps
    if options.report and not any(stopped(s.metrics) for s in steps):
        write_recipe_report(steps, options.out, options.title)
    return steps


def _announce(step: Step, number: int, total: int, elapsed: float) -> None:
    """The progress line above a stage's own bar: which stage, how far into the run, what it reads and
    writes, and an ETA where an earlier run of it in the same folder says how long it took."""
    entry = stage(step.name)
    source = getattr(step.config, entry.takes, "") if entry.takes else ""
    what = f"{source} -> {step.out}" if source and step.out else step.out or str(source)
    earlier = read_manifest(step.out) if step.out else None
    eta = ""
    if earlier and earlier.get("wall_time_s"):
        eta = f" · its last run took {_clock(earlier['wall_time_s'])}"
    print(f"[{number}/{total}] {step.name} · {_clock(elapsed)} into the run · {what}{eta}", flush=True)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def stopped(metrics: Any) -> bool:
    """A stage that returned because of Ctrl-C or SIGTERM (early stopping is a normal end)."""
    return isinstance(metrics, dict) and metrics.get("stopped_by") in ("SIGINT", "SIGTERM")


def write_recipe_report(steps: list[Step], out: str, title: str = "") -> dict[str, Any] | None:
    """`llmk report` over every folder the recipe wrote, beside them (in `out`, or their common parent)."""
    from llmkernel.report.build import write_report

    folders = [step.out for step in steps if step.out and read_manifest(step.out) is not None]
    if not folders:
        return None
    root = Path(out) if out else Path(os.path.commonpath([os.path.abspath(f) for f in folders]))
    if len(folders) == 1 and not out:
        root = root.parent
    return write_report(folders, root / REPORT_FOLDER, title)


def run_recipe(path: str | Path, options: Options | None = None) -> list[Step]:
    """`llmk run PATH`: the recipe's relative inputs are also looked up beside the recipe file."""
    path = Path(path)
    options = options or Options()
    options = dataclasses.replace(options, title=options.title or f"llmk run {path.name}")
    return run_stages(load_yaml(path), options, base=path.resolve().parent)
