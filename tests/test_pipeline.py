"""`llmk run` and `llmk demo`: sections run in the registry's order, chained by folder, with one-line errors,
--out/--from/--until/--resume; the demo's labeled task; end to end through the real CLI (`-m e2e`)."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from llmkernel import demo, pipeline
from llmkernel.config import load_yaml
from llmkernel.errors import ConfigError, InputError
from llmkernel.io.tables import read_table
from llmkernel.pipeline import Options
from llmkernel.stages import RECIPE_STAGES
from tests.conftest import REPO, _corpus, run_llmk


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_nothing_imports_the_cli_or_the_pipeline():
    package = REPO / "llmkernel"
    importers = {
        str(path.relative_to(REPO))
        for path in package.rglob("*.py")
        if _imports(path) & {"llmkernel.cli", "llmkernel.pipeline"}
    }
    # only the CLI, lazily, to run `llmk run` and `llmk demo`; the demo is a recipe run through the pipeline
    assert importers == {"llmkernel/cli.py", "llmkernel/demo.py"}
    assert not _imports(package / "stages.py") & {"llmkernel.cli", "llmkernel.pipeline"}
    code = "import sys, llmkernel.pipeline; print('llmkernel.cli' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


@dataclass
class _FakeConfig:
    value: int = 0
    force: bool = False
    data: str = ""


@dataclass
class _FakeStage:
    name: str
    ran: list = field(default_factory=list)
    result: dict = field(default_factory=dict)
    takes: str = ""
    accepts: tuple = ()
    gives: str = ""

    def config_class(self) -> type:
        return _FakeConfig

    def run_in_recipe(self, config: _FakeConfig, **options) -> dict:
        self.ran.append((self.name, config))
        outcome = self.result.get(self.name, {"value": config.value})
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


@pytest.fixture
def fake_stages(monkeypatch):
    ran: list = []
    results: dict = {}
    monkeypatch.setattr(pipeline, "stage", lambda name: _FakeStage(name, ran, results))
    return ran, results


NO_REPORT = Options(report=False)


def test_sections_run_in_the_registry_order_whatever_the_file_order(fake_stages, capsys):
    ran, _ = fake_stages
    recipe = {"evaluate": {"value": 4}, "finetune": {"value": 3}, "prepare": {"value": 1}}
    steps = pipeline.run_stages(recipe, Options(force=True, report=False))
    assert [name for name, _ in ran] == ["prepare", "finetune", "evaluate"]
    assert [s.name for s in steps] == ["prepare", "finetune", "evaluate"] and steps[1].metrics == {"value": 3}
    assert all(config.force for _, config in ran)  # `llmk run --force` reaches every stage
    out = capsys.readouterr().out  # one progress line per stage, then how long it took
    assert "[1/3] prepare · 0:00:00 into the run" in out and "[3/3] evaluate" in out
    assert "  finetune finished in 0:00:00" in out


def test_every_section_is_checked_before_any_stage_runs(fake_stages):
    ran, _ = fake_stages
    with pytest.raises(ConfigError, match="unknown field 'evaluate.valu'"):
        pipeline.run_stages({"prepare": {}, "evaluate": {"valu": 1}}, NO_REPORT)
    assert ran == []


def test_a_missing_input_file_fails_before_any_stage_runs(fake_stages, tmp_path):
    ran, _ = fake_stages
    missing = str(tmp_path / "task" / "train.jsonl")
    with pytest.raises(InputError, match=rf"^evaluate.data: {missing} does not exist and no section"):
        pipeline.run_stages({"prepare": {"value": 1}, "evaluate": {"data": missing}}, NO_REPORT)
    assert ran == []  # not after prepare and pretrain have run
    recipe = {"prepare": {"value": 1}, "evaluate": {"data": "builtin:x"}}
    steps = pipeline.plan(recipe, NO_REPORT, check_files=True)  # builtin: names are not files
    assert [s.name for s in steps] == ["prepare", "evaluate"]


def test_an_unknown_section_lists_the_stages_a_recipe_holds():
    with pytest.raises(ConfigError) as error:
        pipeline.run_stages({"prepare": {}, "pretrian": {}})
    assert str(error.value) == f"unknown recipe section 'pretrian'; known stages: {', '.join(RECIPE_STAGES)}"
    with pytest.raises(
        ConfigError, match=r"`llmk run` does not chain report; run `llmk report --config RECIPE`"
    ):
        pipeline.run_stages({"report": {}})
    with pytest.raises(ConfigError, match="the recipe has no stage sections; add one of: prepare, pretrain"):
        pipeline.run_stages({})
    with pytest.raises(ConfigError, match="finetune: expected a mapping of config fields"):
        pipeline.run_stages({"finetune": "all-minilm-l6-v2"})


def test_a_stage_stopped_by_a_signal_ends_the_chain(fake_stages, capsys):
    ran, results = fake_stages
    results["pretrain"] = {"step": 3, "stopped_by": "SIGTERM"}
    steps = pipeline.run_stages({"pretrain": {}, "evaluate": {}})
    assert [name for name, _ in ran] == ["pretrain"] and steps[1].metrics == {}
    assert "pretrain was stopped; not running evaluate (continue with --resume)" in capsys.readouterr().out


def test_a_failing_stage_stops_the_chain_with_its_one_line_error_named(fake_stages):
    ran, results = fake_stages
    results["finetune"] = InputError("train.tsv: no column 'label'")
    with pytest.raises(InputError, match=r"^finetune: train.tsv: no column 'label'$"):
        pipeline.run_stages({"prepare": {}, "finetune": {}, "evaluate": {}}, NO_REPORT)
    assert [name for name, _ in ran] == ["prepare", "finetune"]


def test_from_and_until_run_a_range(fake_stages):
    ran, _ = fake_stages
    recipe = {"prepare": {}, "pretrain": {}, "finetune": {}, "evaluate": {}}
    pipeline.run_stages(recipe, Options(start="pretrain", until="finetune", report=False))
    assert [name for name, _ in ran] == ["pretrain", "finetune"]
    with pytest.raises(ConfigError, match="--from prune: the recipe has no 'prune' section; it has prepare"):
        pipeline.run_stages(recipe, Options(start="prune"))
    with pytest.raises(ConfigError, match="--from evaluate comes after --until pretrain"):
        pipeline.run_stages(recipe, Options(start="evaluate", until="pretrain"))


FULL_CHAIN = {  # no section names its input: each takes an earlier one's output
    "serve": {},
    "prepare": {"inputs": ["corpus/"], "out": "w/data"},
    "pretrain": {"out": "w/model"},
    "finetune": {"task": "classify", "data": {"train": "t.tsv", "eval": "e.tsv"}, "out": "w/classifier"},
    "evaluate": {"out": "w/eval"},
    "prune": {"out": "w/pruned", "ffn": 0.25},
    "quantize": {"out": "w/quantized"},
    "export": {"out": "w/onnx", "format": "onnx"},
}


def test_each_section_takes_the_latest_output_of_the_kind_it_reads():
    steps = {step.name: step.config for step in pipeline.plan(FULL_CHAIN, Options())}
    assert steps["pretrain"].data == "w/data"
    assert steps["finetune"].model == "w/model"
    assert steps["evaluate"].model == "w/classifier" and steps["evaluate"].data == "e.tsv"
    assert steps["prune"].model == "w/classifier" and steps["prune"].measure.eval == "e.tsv"
    assert steps["quantize"].model == "w/pruned" and steps["quantize"].measure.eval == "e.tsv"
    assert steps["export"].model == "w/pruned"  # fp32 folders only: export quantizes for its runtime
    assert steps["serve"].model == "w/quantized"


def test_a_named_input_is_kept():
    recipe = {**FULL_CHAIN, "quantize": {"model": "w/classifier", "out": "w/quantized"}}
    steps = {step.name: step.config for step in pipeline.plan(recipe, Options())}
    assert steps["quantize"].model == "w/classifier" and steps["serve"].model == "w/quantized"


def test_out_puts_every_folder_under_it_and_named_inputs_follow(tmp_path):
    recipe = {  # as recipes/sst2-classifier.yaml: evaluate names finetune's out
        "finetune": {"task": "classify", "model": "m", "data": {"train": "t.tsv"}, "out": "runs/sst2/full"},
        "evaluate": {"model": "runs/sst2/full", "data": "d.tsv", "out": "runs/sst2/eval-typo"},
        "quantize": {},
    }
    steps = {step.name: step for step in pipeline.plan(recipe, Options(out=str(tmp_path / "x")))}
    assert steps["finetune"].out == str(tmp_path / "x" / "full")
    assert steps["evaluate"].config.model == str(tmp_path / "x" / "full")
    assert steps["evaluate"].out == str(tmp_path / "x" / "eval-typo")
    assert steps["quantize"].out == str(tmp_path / "x" / "quantize")  # no out of its own: the stage's name
    assert steps["quantize"].config.model == str(tmp_path / "x" / "full")


def test_relative_inputs_are_found_in_the_working_directory_then_beside_the_recipe(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "train.tsv").write_text("text\tlabel\nok\tpos\n")
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "here.tsv").write_text("text\tlabel\nok\tpos\n")
    monkeypatch.chdir(tmp_path / "cwd")
    path = tmp_path / "recipes" / "r.yaml"
    path.write_text(
        json.dumps(
            {
                "finetune": {"task": "classify", "model": "all-minilm-l6-v2", "data": {"train": "train.tsv"}},
                "evaluate": {"data": "here.tsv"},
            }
        )
    )
    steps = {step.name: step.config for step in pipeline.plan(load_yaml(path), Options(), base=path.parent)}
    assert steps["finetune"].data.train == str(tmp_path / "recipes" / "train.tsv")  # beside the recipe
    assert steps["evaluate"].data == "here.tsv"  # the working directory first
    assert steps["finetune"].model == "all-minilm-l6-v2"  # a model name is not a path
    assert steps["finetune"].out == "runs/finetune"  # outputs: the working directory


def test_from_needs_the_earlier_folders(tmp_path):
    recipe = {
        "prepare": {"inputs": ["c"], "out": str(tmp_path / "data")},
        "pretrain": {"out": str(tmp_path / "model")},
    }
    with pytest.raises(InputError, match=r"--from pretrain: prepare's folder .*data holds no finished run"):
        pipeline.plan(recipe, Options(start="pretrain"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "run.json").write_text(json.dumps({"stage": "prepare"}))
    steps = pipeline.plan(recipe, Options(start="pretrain"))
    assert [s.runs for s in steps] == [False, True] and steps[1].config.data == str(tmp_path / "data")


def test_resume_reaches_only_the_interrupted_training_stage(tmp_path):
    stopped, finished = tmp_path / "model", tmp_path / "classifier"
    (stopped / "checkpoints" / "step_000010").mkdir(parents=True)
    (finished / "checkpoints").mkdir(parents=True)
    (finished / "run.json").write_text("{}")
    recipe = {
        "pretrain": {"data": "d", "out": str(stopped)},
        "finetune": {"task": "classify", "data": {"train": "t.tsv"}, "out": str(finished)},
    }
    steps = {s.name: s.config for s in pipeline.plan(recipe, Options(resume=True))}
    assert steps["pretrain"].resume and not steps["finetune"].resume
    steps = {s.name: s.config for s in pipeline.plan(recipe, Options())}
    assert not steps["pretrain"].resume


def test_the_demo_recipe_writes_under_out(tmp_path):
    recipe = demo.demo_recipe(tmp_path)
    assert recipe["prepare"]["out"] == str(tmp_path / "data") and recipe["pretrain"]["out"] == str(
        tmp_path / "model"
    )
    assert recipe["finetune"]["data"]["train"] == str(tmp_path / "task" / "train.jsonl")
    assert demo.DEMO_RECIPE["prepare"]["out"] == "runs/demo/data"  # the embedded recipe is not changed
    assert set(recipe) == set(RECIPE_STAGES) - {"distill", "index"}  # the whole lifecycle (no retrieval)


def test_the_demo_task_is_which_part_of_the_library_reference_a_docstring_comes_from(tmp_path):
    counts = demo.write_task(tmp_path)
    rows = {split: read_table(tmp_path / f"{split}.jsonl") for split in ("train", "test")}
    assert counts == {split: len(table) for split, table in rows.items()} and counts["train"] > 800
    assert {row["label"] for row in rows["test"]} == set(demo.LIBRARY_CHAPTERS)
    assert not {row["id"] for row in rows["train"]} & {row["id"] for row in rows["test"]}
    assert {row["label"] for row in rows["train"] if row["id"].startswith("pathlib.")} == {"files"}
    before = (tmp_path / "train.jsonl").stat().st_mtime_ns
    demo.write_task(tmp_path)  # unchanged: not rewritten, so fine-tuning sees the same input and skips
    assert (tmp_path / "train.jsonl").stat().st_mtime_ns == before


# ------------------------------------------------------------------------------------------------- e2e


DEMO_FOLDERS = ("data", "model", "classifier", "eval", "pruned", "quantized", "onnx")


@pytest.mark.e2e
def test_llmk_demo_end_to_end(tmp_path, browser):
    out = tmp_path / "demo"
    result = run_llmk("demo", "--out", str(out), timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    stages = ("prepare", "pretrain", "finetune", "evaluate", "prune", "quantize", "export")
    for folder, stage in zip(DEMO_FOLDERS, stages, strict=True):
        assert json.loads((out / folder / "run.json").read_text())["stage"] == stage
    assert (out / "classifier" / "config.json").is_file() and (out / "onnx" / "model.onnx").is_file()
    tuned = json.loads((out / "classifier" / "run.json").read_text())["metrics"]
    assert tuned["eval_accuracy"] > 0.5  # 7 labels, the majority one is 0.24 of the test docstrings
    attacked = json.loads((out / "eval" / "eval.json").read_text())["attack"]
    assert 0 < attacked["accuracy"] <= tuned["eval_accuracy"] + 0.05
    for number, stage in enumerate((*stages, "serve"), 1):
        assert f"[{number}/8] {stage} · " in result.stdout
    assert "POST /v1/classify           200 in" in result.stdout
    assert f"What the demo wrote under {out}/:" in result.stdout and "Next:" in result.stdout
    assert f"llmk serve {out}/quantized" in result.stdout
    # its report opens in a browser with every section and plot
    browser.get((out / "report" / "report.html").as_uri())
    sections = browser.execute_script("return [...document.querySelectorAll('section')].map(s => s.id)")
    assert {"data", "training", "evaluation", "compression", "generations", "configs"} <= set(sections)
    assert browser.execute_script("return [...document.images].every(i => i.complete && i.naturalWidth > 0)")
    screenshots = REPO / "runs" / "screenshots"
    screenshots.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(screenshots / "demo-report.png"))
    again = run_llmk("demo", "--out", str(out), timeout=600)  # every stage up to date: skipped
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("is up to date") + again.stderr.count("is up to date") >= len(stages) - 1
    assert json.loads((out / "classifier" / "run.json").read_text())["metrics"] == tuned


def _tiny_recipe(tmp_path: Path, steps: int = 4, checkpoint_every: int = 0) -> Path:
    """prepare -> pretrain -> evaluate on a small corpus; no section names its input."""
    _corpus(tmp_path / "corpus", documents=30, words=200)
    text = tmp_path / "held_out.txt"
    text.write_text((tmp_path / "corpus" / "doc000.txt").read_text())
    recipe = {  # sections out of order on purpose: they run in pipeline order
        "evaluate": {"data": "held_out.txt", "out": "eval", "threads": 1},  # beside the recipe
        "prepare": {
            "inputs": ["corpus"],
            "out": "data",
            "workers": 1,
            "progress": False,
            "dedup": {"near": False},
            "filter": {"enabled": False},
            "tokenizer": {"kind": "bpe", "vocab_size": 300},
            "pack": {"val_fraction": 0.1},
        },
        "pretrain": {
            "out": "model",
            "model": {"size": "tiny"},
            "train": {
                "batch_size": 4,
                "seq_len": 32,
                "max_steps": steps,
                "eval_batches": 2,
                "sample_tokens": 0,
                "threads": 1,
                "checkpoint_every": checkpoint_every,
            },
            "optim": {"warmup_steps": 1},
            "progress": False,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


@pytest.mark.e2e
def test_llmk_run_chains_the_stages_under_out_and_writes_the_report(tmp_path):
    path, out = _tiny_recipe(tmp_path), tmp_path / "out"
    result = run_llmk("run", str(path), "--out", str(out), cwd=tmp_path.parent)  # inputs: beside the recipe
    assert result.returncode == 0, result.stderr[-3000:]
    for stage, folder in (("prepare", "data"), ("pretrain", "model"), ("evaluate", "eval")):
        assert json.loads((out / folder / "run.json").read_text())["stage"] == stage
    assert json.loads((out / "model" / "run.json").read_text())["metrics"]["step"] == 4
    assert json.loads((out / "model" / "run.json").read_text())["config"]["data"] == str(out / "data")
    report = json.loads((out / "eval" / "eval.json").read_text())
    assert report["task"] == "lm" and report["bits_per_byte"] > 0
    assert (out / "report" / "report.html").is_file() and (out / "report" / "report.md").is_file()
    assert "[2/3] pretrain · " in result.stdout and f"{out / 'data'} -> {out / 'model'}" in result.stdout
    again = run_llmk("run", str(path), "--out", str(out), "--until", "pretrain", "--no-report")
    assert again.returncode == 0 and (again.stdout + again.stderr).count("is up to date") == 2
    assert "evaluate" not in again.stdout


@pytest.mark.e2e
def test_a_stage_stopped_by_sigterm_stops_the_chain_and_run_resume_continues_it(tmp_path):
    path, out = _tiny_recipe(tmp_path, steps=400, checkpoint_every=5), tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "llmkernel.cli", "run", str(path), "--out", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    deadline = time.monotonic() + 300
    while not (out / "model" / "checkpoints" / "step_000005").is_dir() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert "pretrain was stopped; not running evaluate (continue with --resume)" in output
    assert not (out / "eval").exists() and not (out / "model" / "run.json").exists()
    refused = run_llmk("run", str(path), "--out", str(out))  # the stage's own message names --resume
    assert refused.returncode == 2 and "pass --resume to continue it" in refused.stderr
    resumed = run_llmk("run", str(path), "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resum" in resumed.stdout.lower() + resumed.stderr.lower()
    assert json.loads((out / "model" / "run.json").read_text())["metrics"]["step"] == 400
    assert (out / "eval" / "eval.json").is_file() and (out / "report" / "report.html").is_file()
