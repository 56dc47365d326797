"""`llmk finetune classify` through the real CLI: SIGKILL after a checkpoint, then `--resume`, ends with the
metrics, evaluation and weights of an uninterrupted run."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import kill_after_checkpoint, run_llmk

FILLER = ["hello", "world", "the", "alice", "bob", "lives", "works", "in", "me"]


def _write_csv(path, count: int, seed: int) -> str:
    """Two labels, given away by one word: paris -> positive, berlin -> negative."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        city = rng.choice(["paris", "berlin"])
        words = rng.choices(FILLER, k=rng.randint(2, 8))
        words.insert(rng.randrange(len(words) + 1), city)
        rows.append(f"{' '.join(words)},{'positive' if city == 'paris' else 'negative'}\n")
    path.write_text("text,label\n" + "".join(rows))
    return str(path)


@pytest.mark.e2e
def test_sigkill_then_resume_ends_like_an_uninterrupted_run(bert_folder, tmp_path):
    train, dev = _write_csv(tmp_path / "train.csv", 160, 0), _write_csv(tmp_path / "dev.csv", 40, 1)
    # 20 steps an epoch, 10 epochs: an evaluation, the best model and a checkpoint every 20 steps;
    # dropout is on, so the resumed run must restore the RNG states too
    args = ["finetune", "classify", "--model", str(bert_folder), "--data.train", train, "--data.eval", dev]
    args += ["--epochs", "10", "--patience", "0", "--train.batch_size", "8", "--optim.lr", "3e-3"]
    args += ["--train.keep_checkpoints", "20", "--train.threads", "1", "--progress", "false"]
    straight = run_llmk(*args, "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "killed"
    kill_after_checkpoint(args, out, 40)
    assert (out / "checkpoints" / "step_000040").is_dir()
    assert not (out / "run.json").exists()  # an interrupted run never looks finished
    assert not (out / "checkpoints" / "step_000200").exists(), "the run ended before it was killed"

    unfinished = run_llmk(*args, "--out", str(out))
    assert unfinished.returncode == 2 and "--resume" in unfinished.stderr
    resumed = run_llmk(*args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout

    final = json.loads((tmp_path / "straight" / "run.json").read_text())["metrics"]
    final_resumed = json.loads((out / "run.json").read_text())["metrics"]
    for name in ("step", "best_step", "best_accuracy", "eval_accuracy", "eval_macro_f1", "stopped_by"):
        assert final_resumed[name] == final[name], name
    for name in ("train_loss", "eval_loss"):
        assert final_resumed[name] == pytest.approx(final[name], abs=1e-6), name
    report = json.loads((out / "eval.json").read_text())
    assert report["accuracy"] == json.loads((tmp_path / "straight" / "eval.json").read_text())["accuracy"]
    weights, expected = (
        load_file(out / "model.safetensors"),
        load_file(tmp_path / "straight" / "model.safetensors"),
    )
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, atol=1e-6, rtol=0, msg=name)
    assert not (out / "best").exists()
