from __future__ import annotations

import json

import pytest

from llmkernel.errors import UserError
from llmkernel.runs import (
    Manifest,
    atomic_write_json,
    describe_inputs,
    fingerprint,
    is_up_to_date,
    read_manifest,
    staging_folder,
)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_staging_folder_replaces_out_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staging_folder(out) as stage:
        (stage / "new.txt").write_text("half")
        raise RuntimeError("killed")
    assert (out / "old.txt").read_text() == "old"  # the earlier output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # and the staging folder is gone
    with staging_folder(out) as stage:
        (stage / "new.txt").write_text("done")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]


def test_unwritable_out_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        with staging_folder(blocker):
            pass


def test_manifest_records_inputs_outputs_and_fingerprint(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("hello")
    inputs = describe_inputs([source])
    assert inputs[0]["bytes"] == 5 and len(inputs[0]["sha256"]) == 64
    run_fingerprint = fingerprint({"a": 1}, inputs)
    assert run_fingerprint != fingerprint({"a": 2}, inputs)
    out = tmp_path / "run"
    out.mkdir()
    (out / "result.txt").write_text("r")
    record = Manifest("prepare", {"a": 1}, inputs, run_fingerprint, metrics={"m": 1}).write(out)
    assert record["outputs"] == [{"path": "result.txt", "bytes": 1}]
    assert read_manifest(out)["metrics"] == {"m": 1}
    assert is_up_to_date(out, "prepare", run_fingerprint)
    assert not is_up_to_date(out, "pretrain", run_fingerprint)


def test_fingerprint_leaves_out_how_to_run_fields():
    inputs = [{"path": "data.txt", "sha256": "0" * 64}]
    config = {"out": "a", "train": {"threads": 1, "compile": "auto", "lr": 1.0}}
    run_only = ("out", "train.threads", "train.compile", "missing.field")
    same = fingerprint({"out": "b", "train": {"threads": 2, "compile": "true", "lr": 1.0}}, inputs, run_only)
    assert fingerprint(config, inputs, run_only) == same
    assert fingerprint(config, inputs, run_only) != fingerprint(
        {**config, "train": {**config["train"], "lr": 2.0}}, inputs, run_only
    )
    assert config["train"]["threads"] == 1  # the caller's dict is left alone


def test_a_failed_run_leaves_no_empty_parent_folders_behind(tmp_path):
    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError), staging_folder(out):
        raise RuntimeError("the stage failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())
    with staging_folder(out) as stage:
        (stage / "x").write_text("1")
    assert (out / "x").read_text() == "1"
