"""`llmk`'s parser: built from the stage registry, lazy, with suggestions for typos and a required task."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import subprocess
import sys

import pytest

from llmkernel.cli import build_parser, did_you_mean, main
from llmkernel.config import build, config_from_args
from llmkernel.errors import ConfigError
from llmkernel.stages import RECIPE_STAGES, STAGES, stage
from llmkernel.train.config import FINETUNE_TASKS, FinetuneConfig
from tests.conftest import REPO


def _stage_parser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def _exit_code(argv: list[str], capsys) -> tuple[int, str]:
    """Run `main(argv)`, whether it returns or argparse exits; returns (exit code, stderr)."""
    handler = signal.getsignal(signal.SIGTERM)  # main installs its own
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    finally:
        signal.signal(signal.SIGTERM, handler)
    return code, capsys.readouterr().err


def test_the_registry_is_in_pipeline_order_and_recipes_chain_all_but_the_report():
    compress = ["prune", "distill", "quantize", "export"]
    lifecycle = ["prepare", "pretrain", "finetune", "index", "evaluate", *compress, "serve"]
    assert [s.name for s in STAGES] == [*lifecycle, "deploy", "report"]
    assert RECIPE_STAGES == tuple(
        lifecycle
    )  # `llmk run` writes the report itself, at the end; deploy renders
    assert stage("evaluate").config_path == "llmkernel.eval.config:EvaluateConfig"
    with pytest.raises(KeyError):
        stage("pretrian")


@pytest.mark.parametrize("entry", STAGES, ids=[s.name for s in STAGES])
def test_every_stage_names_a_config_dataclass_and_a_run_function(entry):
    from llmkernel.stages import _load

    assert dataclasses.is_dataclass(entry.config_class())
    assert callable(_load(entry.run_path))


def test_the_top_level_parser_imports_no_stage():
    """`llmk --help` stays fast: a stage's config (and torch) is imported only when that stage is used."""
    code = (
        "import sys\n"
        "from llmkernel.cli import build_parser\n"
        "build_parser().format_help()\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.endswith('.config') and m != 'llmkernel.config'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_every_command_is_listed_in_the_top_level_help():
    text = build_parser().format_help()
    for name in [s.name for s in STAGES] + ["demo", "run", "keys"]:
        assert f"    {name}" in text


def test_did_you_mean():
    assert did_you_mean("pretrian", [s.name for s in STAGES]) == "; did you mean pretrain?"
    assert did_you_mean("--data.trian", ["--data.train", "--data.eval"]) == "; did you mean --data.train?"
    assert did_you_mean("zzz", ["prepare", "serve"]) == ""


def test_an_unknown_flag_shows_the_stage_usage_and_the_closest_flag(capsys):
    code, err = _exit_code(["finetune", "classify", "--data.trian", "x.csv"], capsys)
    assert code == 2
    assert err.startswith(f"usage: llmk finetune [-h] {{{','.join(FINETUNE_TASKS)}}} [--config YAML]")
    assert (
        "llmk finetune: error: unrecognized arguments: --data.trian x.csv; did you mean --data.train?" in err
    )
    code, err = _exit_code(["pretrain", "--train.max_stpes=3"], capsys)
    assert code == 2 and "usage: llmk pretrain" in err and "did you mean --train.max_steps?" in err


def test_a_misspelled_command_or_task_names_the_closest(capsys):
    code, err = _exit_code(["pretrian"], capsys)
    assert code == 2 and err.startswith("usage: llmk [-h]") and "did you mean pretrain?" in err
    code, err = _exit_code(["finetune", "clasify", "--model", "m"], capsys)
    assert code == 2 and "usage: llmk finetune" in err and "did you mean classify?" in err


def test_finetune_help_shows_the_task_as_a_required_positional_with_its_choices():
    text = _stage_parser("finetune").format_help()
    choices = "{" + ",".join(FINETUNE_TASKS) + "}"  # classify,ner,sft,...: every task of the registry
    assert text.startswith(f"usage: llmk finetune [-h] {choices} [--config YAML]")
    assert choices in text.split("positional arguments:")[1] and "; required" in text
    assert "[model]" in _stage_parser("evaluate").format_usage()  # an optional positional keeps brackets


def test_finetune_without_a_task_is_one_line_and_exit_2(capsys, tmp_path):
    code, err = _exit_code(["finetune", "--model", "m", "--data.train", str(tmp_path / "t.csv")], capsys)
    assert code == 2
    assert (
        err
        == f"llmk finetune: error: task: required as the first argument: `llmk finetune {'|'.join(FINETUNE_TASKS)} ...`\n"
    )
    assert not (tmp_path / "runs").exists()


def test_the_task_may_come_from_the_config_file(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("finetune:\n  task: ner\n  model: m\n  data:\n    train: t.conll\n")
    parsed = build_parser().parse_args(["finetune", "--config", str(recipe)])
    assert config_from_args(FinetuneConfig, parsed, "finetune").task == "ner"
    parsed = build_parser().parse_args(["finetune", "sft", "--config", str(recipe)])
    assert config_from_args(FinetuneConfig, parsed, "finetune").task == "sft"  # the command line wins


def test_the_task_has_no_default_in_the_schema():
    assert FinetuneConfig.__dataclass_fields__["task"].default is dataclasses.MISSING
    with pytest.raises(
        ConfigError, match=rf"finetune\.task: a value is required \(one of {', '.join(FINETUNE_TASKS)}\)"
    ):
        build(FinetuneConfig, {"model": "m", "data": {"train": "t.csv"}}, prefix="finetune.")
    for task in FINETUNE_TASKS:
        assert build(FinetuneConfig, {"task": task, "model": "m", "data": {"train": "t"}}).task == task
