"""`llmk run` and `llmk demo`: sections run in the registry's order, one-line errors, the demo explains both
stages; end to end through the real CLI (`-m e2e`)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from llmkernel import pipeline
from llmkernel.errors import ConfigError
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
    assert importers == {"llmkernel/cli.py"}  # only the CLI, lazily, to run `llmk run` and `llmk demo`
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


@dataclass
class _FakeStage:
    name: str
    ran: list = field(default_factory=list)
    result: dict = field(default_factory=dict)

    def config_class(self) -> type:
        return _FakeConfig

    def run(self, config: _FakeConfig) -> dict:
        self.ran.append((self.name, config))
        return self.result.get(self.name, {"value": config.value})


@pytest.fixture
def fake_stages(monkeypatch):
    ran: list = []
    results: dict = {}
    monkeypatch.setattr(pipeline, "stage", lambda name: _FakeStage(name, ran, results))
    return ran, results


def test_sections_run_in_the_registry_order_whatever_the_file_order(fake_stages):
    ran, _ = fake_stages
    recipe = {"evaluate": {"value": 4}, "finetune": {"value": 3}, "prepare": {"value": 1}}
    metrics = pipeline.run_stages(recipe, force=True)
    assert [name for name, _ in ran] == ["prepare", "finetune", "evaluate"]
    assert list(metrics) == ["prepare", "finetune", "evaluate"] and metrics["finetune"] == {"value": 3}
    assert all(config.force for _, config in ran)  # `llmk run --force` reaches every stage


def test_every_section_is_checked_before_any_stage_runs(fake_stages):
    ran, _ = fake_stages
    with pytest.raises(ConfigError, match="unknown field 'evaluate.valu'"):
        pipeline.run_stages({"prepare": {}, "evaluate": {"valu": 1}})
    assert ran == []


def test_an_unknown_section_lists_the_stages_a_recipe_holds():
    with pytest.raises(ConfigError) as error:
        pipeline.run_stages({"prepare": {}, "pretrian": {}})
    assert str(error.value) == f"unknown recipe section 'pretrian'; known stages: {', '.join(RECIPE_STAGES)}"
    with pytest.raises(
        ConfigError, match=r"`llmk run` does not chain serve; run `llmk serve --config RECIPE`"
    ):
        pipeline.run_stages({"serve": {"model": "m"}})
    with pytest.raises(ConfigError, match="the recipe has no stage sections; add one of: prepare, pretrain"):
        pipeline.run_stages({})


def test_a_stage_stopped_by_a_signal_ends_the_chain(fake_stages, capsys):
    ran, results = fake_stages
    results["pretrain"] = {"step": 3, "stopped_by": "SIGTERM"}
    metrics = pipeline.run_stages({"pretrain": {}, "evaluate": {}})
    assert [name for name, _ in ran] == ["pretrain"] and list(metrics) == ["pretrain"]
    assert "pretrain was stopped; not running evaluate" in capsys.readouterr().out


def test_the_demo_explains_the_data_and_the_model_it_trained(monkeypatch, tmp_path):
    calls = []
    trained = {"step": 150, "val_loss": 5.5, "parameters": 870_000, "tokens_seen": 307_200}
    monkeypatch.setattr(pipeline, "run_stages", lambda recipe, force: {"prepare": {}, "pretrain": trained})
    monkeypatch.setattr(pipeline, "explain_prepare", lambda data: calls.append(("prepare", data)))
    monkeypatch.setattr(pipeline, "explain_pretrain", lambda model, metrics: calls.append((model, metrics)))
    pipeline.run_demo(tmp_path)
    assert calls == [("prepare", tmp_path / "data"), (tmp_path / "model", trained)]


def test_the_demo_recipe_writes_under_out(tmp_path):
    recipe = pipeline.demo_recipe(tmp_path)
    assert recipe["prepare"]["out"] == recipe["pretrain"]["data"] == str(tmp_path / "data")
    assert recipe["pretrain"]["out"] == str(tmp_path / "model")
    assert pipeline.DEMO_RECIPE["prepare"]["out"] == "runs/demo/data"  # the embedded recipe is not changed


# ------------------------------------------------------------------------------------------------- e2e


@pytest.mark.e2e
def test_llmk_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = run_llmk("demo", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    data, model = out / "data", out / "model"
    assert {"clean", "tokenizer", "train", "val", "shards.json", "stats.json", "run.json"} <= {
        p.name for p in data.iterdir()
    }
    assert {"config.json", "model.safetensors", "tokenizer.json", "checkpoints", "run.json"} <= {
        p.name for p in model.iterdir()
    }
    assert json.loads((data / "run.json").read_text())["stage"] == "prepare"
    manifest = json.loads((model / "run.json").read_text())
    assert manifest["stage"] == "pretrain" and manifest["metrics"]["step"] == 150
    assert f"What the demo produced in {data}/" in result.stdout
    assert f"What the demo trained in {model}/" in result.stdout
    assert "150 steps over" in result.stdout and "bits per byte" in result.stdout
    sample = result.stdout.split("from the prompt 'The for statement':")[1].strip()
    assert sample.startswith("'The for statement") and len(sample) > len("'The for statement'")


@pytest.mark.e2e
def test_llmk_run_chains_prepare_pretrain_and_evaluate(tmp_path):
    _corpus(tmp_path / "corpus", documents=30, words=200)
    text = tmp_path / "held_out.txt"
    text.write_text((tmp_path / "corpus" / "doc000.txt").read_text())
    folders = {name: tmp_path / name for name in ("data", "model", "eval")}
    recipe = {  # sections out of order on purpose: they run in pipeline order
        "evaluate": {
            "model": str(folders["model"]),
            "data": str(text),
            "out": str(folders["eval"]),
            "threads": 1,
        },
        "prepare": {
            "inputs": [str(tmp_path / "corpus")],
            "out": str(folders["data"]),
            "workers": 1,
            "progress": False,
            "dedup": {"near": False},
            "filter": {"enabled": False},
            "tokenizer": {"kind": "bpe", "vocab_size": 300},
            "pack": {"val_fraction": 0.1},
        },
        "pretrain": {
            "data": str(folders["data"]),
            "out": str(folders["model"]),
            "model": {"size": "tiny"},
            "train": {
                "batch_size": 4,
                "seq_len": 32,
                "max_steps": 4,
                "eval_batches": 2,
                "sample_tokens": 0,
                "threads": 1,
            },
            "optim": {"warmup_steps": 1},
            "progress": False,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    result = run_llmk("run", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    for stage, folder in (("prepare", "data"), ("pretrain", "model"), ("evaluate", "eval")):
        manifest = json.loads((folders[folder] / "run.json").read_text())
        assert manifest["stage"] == stage
    assert json.loads((folders["model"] / "run.json").read_text())["metrics"]["step"] == 4
    report = json.loads((folders["eval"] / "eval.json").read_text())
    assert report["task"] == "lm" and report["bits_per_byte"] > 0
    again = run_llmk("run", str(path))  # every stage is up to date the second time
    assert again.returncode == 0 and "up to date" in again.stdout + again.stderr
