"""`llmk pretrain` through the real CLI: SIGKILL and resume, SIGTERM, errors, compiling (two processes: test_dist)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from llmkernel.models.attention import load_cpu_kernel
from tests.conftest import REPO, kill_after_checkpoint, run_llmk

COMMON = [
    "--model.size",
    "tiny",
    "--train.batch_size",
    "8",
    "--train.seq_len",
    "32",
    "--train.log_every",
    "1",
    "--train.eval_batches",
    "2",
    "--train.sample_tokens",
    "0",
    "--train.threads",
    "1",
    "--progress",
    "false",
    "--optim.warmup_steps",
    "2",
]


def losses(out) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


@pytest.mark.e2e
def test_sigkill_then_resume_ends_like_an_uninterrupted_run(bpe_data, tmp_path):
    args = [
        "pretrain",
        "--data",
        str(bpe_data),
        *COMMON,
        "--train.max_steps",
        "40",
        "--train.checkpoint_every",
        "10",
    ]
    straight = run_llmk(*args, "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "killed"
    kill_after_checkpoint(args, out, 20)
    assert not (out / "run.json").exists()  # an interrupted run never looks finished
    resumed = run_llmk(*args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    final = json.loads((tmp_path / "straight" / "run.json").read_text())["metrics"]
    final_resumed = json.loads((out / "run.json").read_text())["metrics"]
    assert final_resumed["train_loss"] == pytest.approx(final["train_loss"], abs=1e-6)
    assert final_resumed["val_loss"] == pytest.approx(final["val_loss"], abs=1e-6)


@pytest.mark.e2e
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(bpe_data, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmkernel.cli",
            "pretrain",
            "--data",
            str(bpe_data),
            *COMMON,
            "--train.max_steps",
            "100000",
            "--out",
            str(out),
        ],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "Continue with --resume" in stdout
    assert (out / "checkpoints").is_dir() and not (out / "run.json").exists()


@pytest.mark.e2e
def test_cli_errors_exit_2(bpe_data, tmp_path):
    cases = [
        (["--data", str(tmp_path)], "no token shards"),
        (
            ["--data", str(bpe_data), "--model.init_from", "all-minilm-l6-v2", "--objective", "mlm"],
            "vocabulary",
        ),
        (["--data", str(bpe_data), "--model.context_length", "16"], "larger than model.context_length"),
        (["--data", str(bpe_data), "--train.lr", "1"], "unrecognized arguments: --train.lr"),
    ]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases.append((["--data", str(bpe_data), "--out", str(blocker / "sub")], "not a writable folder"))
    for args, message in cases:
        result = run_llmk(
            "pretrain", *COMMON, *args, *([] if "--out" in args else ["--out", str(tmp_path / "o")])
        )
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


@pytest.mark.e2e
def test_compiled_training_follows_the_eager_losses(bpe_data, tmp_path):
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        pytest.skip("torch.compile on CPU needs a C++ compiler, and none is installed")
    kernel_problem = load_cpu_kernel()  # None: built (and cached), so the run below uses it
    args = ["pretrain", "--data", str(bpe_data), *COMMON, "--train.max_steps", "6"]
    eager = run_llmk(*args, "--train.compile", "false", "--out", str(tmp_path / "eager"))
    compiled = run_llmk(*args, "--train.compile", "true", "--out", str(tmp_path / "compiled"))
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr
    assert "training step: compiled" in compiled.stdout
    if kernel_problem is None:
        assert "attention: llmk's fp32 CPU causal kernel" in compiled.stdout  # the kernel built and runs
    else:
        assert kernel_problem in compiled.stdout  # SDPA, and the run's log says why
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-3)
    assert (tmp_path / "compiled" / "model.safetensors").is_file()  # saved without torch.compile's prefixes
    saved_config = (tmp_path / "compiled" / "config.json").read_text()
    assert "llmk_causal_sdpa" not in saved_config  # a plain HF folder
    assert "llmk_causal_cpu" not in saved_config
