"""Two processes on CPU (gloo): the FSDP helpers, and `llmk pretrain` / `llmk finetune classify` under
`torchrun --nproc-per-node 2` with DDP and FSDP, evaluation, samples and checkpoints included.

The same global batch on one process and on two gives the same losses and weights (both strategies
reduce the mean gradient), so each two-process run is checked against the one-process run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, run_llmk

PRETRAIN = [
    "--model.size",
    "tiny",
    "--train.seq_len",
    "32",
    "--train.max_steps",
    "6",
    "--train.eval_every",
    "3",
    "--train.checkpoint_every",
    "3",
    "--train.eval_batches",
    "2",
    "--train.sample_tokens",
    "8",
    "--train.log_every",
    "1",
    "--train.threads",
    "1",
    "--progress",
    "false",
    "--optim.warmup_steps",
    "2",
]


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m llmkernel.cli ARGS` (a free port of its own)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run(
        [*command, "-m", "llmkernel.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def train_losses(out) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


# Measured: 2-process FSDP vs one process, the key biases differ by 1.3e-5 (their values are ~6.5e-5, all
# grown from noise); every other weight by at most 6e-8.
NOISE_ONLY_ATOL = 1e-4


def assert_same_weights(folder, reference, atol: float = 1e-5) -> None:
    """Equal weights to `atol`. A BERT key bias has an exactly zero gradient (softmax ignores a constant
    added to every score of a query), so what moves it is rounding noise, which Adam's normalization scales
    up to steps of the learning rate's size; those are compared only to the size such steps reach."""
    weights, expected = load_file(folder / "model.safetensors"), load_file(reference / "model.safetensors")
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        tolerance = NOISE_ONLY_ATOL if name.endswith("attention.self.key.bias") else atol
        difference = float((weights[name] - value).abs().max())
        torch.testing.assert_close(
            weights[name], value, atol=tolerance, rtol=0, msg=f"{name}: {difference:.2e}"
        )


# ------------------------------------------------------------------------------------ the helpers


def _helpers_on_two_ranks(rank: int, port: int) -> None:
    import torch.distributed as torch_dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from llmkernel.dist import cleanup
    from llmkernel.train.loop import StopFlag
    from llmkernel.train.parallel import full_state_dict, gathered, gradient_norm, load_full_state_dict

    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    whole = {k: v.clone() for k, v in model.state_dict().items()}
    fully_shard(model)
    assert isinstance(model[0].weight, DTensor)
    state = full_state_dict(model)  # gathered onto rank 0 only
    assert (set(state) == set(whole)) if rank == 0 else state == {}
    if rank == 0:
        assert all(torch.equal(state[k], whole[k]) for k in whole)
    with gathered(model):  # whole weights: a forward of a submodule alone needs no collective
        assert not isinstance(model[0].weight, DTensor)
        assert torch.equal(model[0].weight, whole["0.weight"])
        if rank == 0:
            model[0](torch.ones(1, 4))
    assert isinstance(model[0].weight, DTensor)  # sharded again
    model(torch.ones(3, 4) * (rank + 1)).sum().backward()
    norms = [None, None]
    torch_dist.all_gather_object(norms, gradient_norm(model.parameters()))
    assert norms[0] == norms[1] > 0  # the global norm, the same on both ranks
    load_full_state_dict(model, {"2.bias": torch.tensor([5.0, 6.0])}, strict=False)
    assert model[2].bias.full_tensor().tolist() == [5.0, 6.0]
    # a signal or the time limit seen by one rank stops both at the same step
    cpu = torch.device("cpu")
    assert StopFlag("SIGINT" if rank == 1 else None).agree(rank == 0, cpu) == "SIGINT"
    assert StopFlag("SIGINT" if rank == 0 else "SIGTERM").agree(False, cpu) == "SIGTERM"
    assert StopFlag().agree(rank == 1, cpu) == "time_limit"
    assert StopFlag().agree(False, cpu) is None
    cleanup()


def test_fsdp_helpers_gather_and_scatter_on_two_gloo_processes():
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    torch.multiprocessing.spawn(_helpers_on_two_ranks, args=(port,), nprocs=2, join=True)


# ------------------------------------------------------------------------------------ llmk pretrain


@pytest.fixture(scope="module")
def one_process_pretrain(bpe_data, tmp_path_factory):
    """The reference: one process with the global batch of 8 (two processes take 4 each)."""
    out = tmp_path_factory.mktemp("pretrain") / "one"
    result = run_llmk(
        "pretrain", "--data", str(bpe_data), *PRETRAIN, "--train.batch_size", "8", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_pretrain_on_two_processes_matches_one(bpe_data, one_process_pretrain, tmp_path, strategy):
    from transformers import AutoModelForCausalLM

    out = tmp_path / strategy
    args = ["pretrain", "--data", str(bpe_data), *PRETRAIN, "--train.batch_size", "4"]
    result = torchrun(*args, "--train.strategy", strategy, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("sample: ") == 2  # at steps 3 and 6, printed once (by rank 0)
    assert result.stdout.count("val loss") == 2
    assert train_losses(out) == pytest.approx(train_losses(one_process_pretrain), abs=1e-5)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000003", "step_000006"]
    metrics = json.loads((out / "run.json").read_text())["metrics"]
    assert metrics["step"] == 6 and metrics["stopped_by"] is None
    assert_same_weights(out, one_process_pretrain)
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2


@pytest.mark.e2e
def test_fsdp_resumes_a_one_process_checkpoint_exactly(bpe_data, one_process_pretrain, tmp_path):
    """Checkpoints hold whole states, so two FSDP processes continue what one process saved."""
    out = tmp_path / "resumed"
    checkpoint = "checkpoints/step_000003"
    shutil.copytree(one_process_pretrain / checkpoint, out / checkpoint)
    args = ["pretrain", "--data", str(bpe_data), *PRETRAIN, "--train.batch_size", "4", "--resume"]
    result = torchrun(*args, "--train.strategy", "fsdp", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout
    assert train_losses(out) == pytest.approx(train_losses(one_process_pretrain)[3:], abs=1e-5)
    assert_same_weights(out, one_process_pretrain)


# ------------------------------------------------------------------------------ llmk finetune classify


@pytest.fixture(scope="module")
def classify_setup(bert_folder, tmp_path_factory):
    """The tiny BERT without dropout (so one process and two draw nothing different), a small csv, and
    the one-process reference run with the same global batch (grad_accum 2 x 8)."""
    import random

    root = tmp_path_factory.mktemp("classify")
    model = shutil.copytree(bert_folder, root / "bert")
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    rng = random.Random(0)
    filler = ["hello", "world", "the", "alice", "bob", "lives", "works", "in", "me"]
    rows = []
    for _ in range(120):
        city = rng.choice(["paris", "berlin"])
        words = rng.choices(filler, k=rng.randint(2, 6))
        words.insert(rng.randrange(len(words) + 1), city)
        rows.append(f"{' '.join(words)},{'positive' if city == 'paris' else 'negative'}\n")
    (root / "train.csv").write_text("text,label\n" + "".join(rows[:96]))
    (root / "dev.csv").write_text("text,label\n" + "".join(rows[96:]))
    args = ["finetune", "classify", "--model", str(model), "--data.train", str(root / "train.csv")]
    args += ["--data.eval", str(root / "dev.csv"), "--epochs", "3", "--train.batch_size", "8"]
    args += ["--optim.lr", "1e-2", "--train.threads", "1", "--progress", "false", "--train.log_every", "1"]
    one = run_llmk(*args, "--train.grad_accum", "2", "--out", str(root / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    return args, root / "one"


@pytest.mark.e2e
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_finetune_classify_on_two_processes_matches_one(classify_setup, tmp_path, strategy):
    from transformers import AutoModelForSequenceClassification

    args, one = classify_setup
    out = tmp_path / strategy
    result = torchrun(*args, "--train.strategy", strategy, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("model saved to") == 1
    assert train_losses(out) == pytest.approx(train_losses(one), abs=1e-5)
    metrics = json.loads((out / "run.json").read_text())["metrics"]
    expected = json.loads((one / "run.json").read_text())["metrics"]
    for name in ("step", "best_step", "best_accuracy", "eval_accuracy"):
        assert metrics[name] == expected[name], name
    assert metrics["eval_loss"] == pytest.approx(expected["eval_loss"], abs=1e-5)
    assert json.loads((out / "eval.json").read_text())["accuracy"] == metrics["eval_accuracy"]
    assert (out / "checkpoints").is_dir() and not (out / "best").exists()
    assert_same_weights(out, one)
    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 2
