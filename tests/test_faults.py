"""Faults while writing, through the real CLI (`-m e2e`): a full disk (here a file-size limit, RLIMIT_FSIZE,
which makes every write past it fail with EFBIG as a full disk fails with ENOSPC) while writing a prepare
output, a checkpoint and a compressed model gives one line and exit 2 with the previous good output intact;
a SIGKILL during a checkpoint save leaves the previous checkpoint intact, and `--resume` uses it."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmkernel.train.checkpoint import list_checkpoints
from tests.compress.test_commands import classifier, classify_files  # noqa: F401  (fixtures)
from tests.conftest import REPO, _corpus, kill_after_checkpoint, run_llmk
from tests.train.test_pretrain_cli import COMMON

pytestmark = pytest.mark.e2e


def run_with_file_limit(limit_bytes: int, *args: str) -> subprocess.CompletedProcess:
    """`llmk *args` with no file allowed past `limit_bytes` (SIGXFSZ ignored, so writes fail with EFBIG)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [sys.executable, "-m", "llmkernel.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(result: subprocess.CompletedProcess, what: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("llmk ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"could not write {what}" in lines[0] and "free some space or choose another --out" in lines[0]


def _no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if ".partial-" in p.name or p.name.startswith(".model-")]


def test_prepare_on_a_full_disk_keeps_the_previous_output(tmp_path):
    _corpus(tmp_path / "corpus")
    out = tmp_path / "data"
    args = ["prepare", str(tmp_path / "corpus"), "--out", str(out), "--workers", "1", "--progress", "false"]
    args += ["--dedup.near", "false", "--filter.enabled", "false", "--tokenizer.vocab_size", "300"]
    assert run_llmk(*args).returncode == 0
    before = _snapshot(out)
    result = run_with_file_limit(8_000, *args, "--force")  # the token shards are ~40 KB
    _one_line_error(result, str(out))
    assert f"the previous {out} is unchanged" in result.stderr
    assert _snapshot(out) == before
    _no_leftovers(tmp_path)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_resume_uses_it(bpe_data, tmp_path):
    out = tmp_path / "model"
    args = ["pretrain", "--data", str(bpe_data), *COMMON, "--train.max_steps", "30"]
    args += ["--train.checkpoint_every", "10"]
    kill_after_checkpoint(args, out, 10)
    [previous] = list_checkpoints(out)
    saved = _snapshot(previous)
    result = run_with_file_limit(64_000, *args, "--out", str(out), "--resume")  # a checkpoint is ~0.5 MB
    _one_line_error(result, str(out / "checkpoints" / "step_000020"))
    assert list_checkpoints(out) == [previous] and _snapshot(previous) == saved
    _no_leftovers(out / "checkpoints")
    resumed = run_llmk(*args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["metrics"]["step"] == 30


def test_a_full_disk_while_quantizing_keeps_the_previous_compressed_model(classifier, tmp_path):  # noqa: F811
    out = tmp_path / "int8"
    args = ["quantize", str(classifier), "--out", str(out), "--progress", "false", "--threads", "1"]
    args += ["--measure.repeats", "1", "--measure.batch_size", "4", "--measure.seq_len", "16"]
    assert run_llmk(*args).returncode == 0
    before = _snapshot(out)
    result = run_with_file_limit(16_000, *args, "--force")
    _one_line_error(result, str(out))
    assert _snapshot(out) == before
    _no_leftovers(tmp_path)


def test_sigkill_during_a_checkpoint_save_keeps_the_previous_checkpoint(bpe_data, tmp_path):
    """Killed the moment the second checkpoint's staging folder appears (mid-save) or, if the save was
    quicker than the poll, right after: either way only complete checkpoints are listed, and --resume
    continues from the last of them to the same end as a run never interrupted."""
    args = ["pretrain", "--data", str(bpe_data), *COMMON, "--train.max_steps", "30"]
    args += ["--train.checkpoint_every", "10"]
    straight = run_llmk(*args, "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "llmkernel.cli", *args, "--out", str(out)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    checkpoints, deadline = out / "checkpoints", time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if checkpoints.is_dir() and any(p.name.startswith(".step_000020") for p in checkpoints.iterdir()):
            break  # the save of step 20 is under way
        if (checkpoints / "step_000020").is_dir():
            break
        time.sleep(0.0005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    complete = list_checkpoints(out)
    assert complete and complete[0].name == "step_000010"
    assert all((c / "config.json").is_file() for c in complete)
    resumed = run_llmk(*args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = json.loads((tmp_path / "straight" / "run.json").read_text())["metrics"]
    final_resumed = json.loads((out / "run.json").read_text())["metrics"]
    assert final_resumed["train_loss"] == pytest.approx(final["train_loss"], abs=1e-6)
