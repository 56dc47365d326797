"""The training loop on a toy task (one process): hooks, samples, throughput, start; the parallel helpers."""

from __future__ import annotations

import json

import pytest
import torch

from llmkernel import dist
from llmkernel.tasks.base import Task
from llmkernel.train.checkpoint import list_checkpoints, load_checkpoint
from llmkernel.train.config import TrainConfig
from llmkernel.train.logger import TrainLogger
from llmkernel.train.loop import LoopHooks, Start, StopFlag, Throughput, plain_backward, run_loop
from llmkernel.train.parallel import (
    full_state_dict,
    gathered,
    gradient_norm,
    gradient_sync,
    load_full_state_dict,
    wrap_for_training,
)


class Regression(Task):
    """y = x . w on 8 fixed batches of 8 rows; `input_ids` are the features (the loop counts their size)."""

    name = "regression"

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 4, generator=generator)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def micro_batches(
        self, step: int, count: int, rank: int, world_size: int
    ) -> list[dict[str, torch.Tensor]]:
        rows = [(step * count * world_size + rank * count + m) % 8 for m in range(count)]
        return [
            {"input_ids": self.x[r * 8 : (r + 1) * 8], "labels": self.y[r * 8 : (r + 1) * 8]} for r in rows
        ]

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return ((model(batch["input_ids"]).squeeze(-1) - batch["labels"]) ** 2).sum()

    @torch.no_grad()
    def evaluate(self, model, device, rank, world_size) -> dict[str, float]:
        return {"loss": float(((model(self.x).squeeze(-1) - self.y) ** 2).mean())}


class TalkingRegression(Regression):
    def sample(self, model, device, max_new_tokens: int) -> str:
        return f"{max_new_tokens} tokens of text"


def run(tmp_path, task: Task | None = None, start: Start | None = None, **kwargs):
    """run_loop on the toy task; returns (result, model, metrics.jsonl records)."""
    start = start or Start()
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    fields = {"batch_size": 8, "seq_len": 1, "max_steps": 6, "eval_every": 2, "checkpoint_every": 3}
    fields.update(log_every=1, sample_tokens=4, keep_checkpoints=10)
    fields.update(kwargs.pop("train", {}))
    config = TrainConfig(**fields)
    rank_info = dist.init()
    if start.step:
        load_checkpoint(list_checkpoints(tmp_path)[-1], model, optimizer, scheduler, rank_info)
    logger = TrainLogger(tmp_path, config.max_steps, start.step, True, progress=False)
    try:
        result = run_loop(
            task=task or Regression(),
            model=model,
            train_module=wrap_for_training(model, config.strategy, rank_info),
            optimizer=optimizer,
            scheduler=scheduler,
            config=config,
            grad_clip=0.0,
            out=tmp_path,
            run_config={"toy": True},
            rank_info=rank_info,
            logger=logger,
            stop=StopFlag(),
            start=start,
            **kwargs,
        )
    finally:
        logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return result, model, records


def test_the_loop_evaluates_checkpoints_and_learns(tmp_path):
    result, _, records = run(tmp_path)
    train = [r["loss"] for r in records if r["split"] == "train"]
    assert [r["step"] for r in records if r["split"] == "val"] == [2, 4, 6]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000003", "step_000006"]
    assert train[-1] < train[0] and result.step == 6 and result.stopped_by is None
    assert result.tokens_seen == 6 * 8 * 4  # the features' size is what the loop counts as tokens


def test_hooks_see_every_evaluation_stop_early_and_add_checkpoint_state(tmp_path):
    seen, passes = [], []

    def on_evaluate(step: int, metrics: dict[str, float]) -> bool:
        seen.append(step)
        return step == 4

    def backward(compute_loss, scale, batch):
        passes.append(len(batch["labels"]))
        return plain_backward(compute_loss, scale, batch)

    hooks = LoopHooks(backward, on_evaluate=on_evaluate, extra_state=lambda: {"mine": 7})
    result, _, _ = run(tmp_path, hooks=hooks)
    assert seen == [2, 4] and result.stopped_by == "early_stopping" and result.step == 4
    assert passes == [8] * 4
    last = list_checkpoints(tmp_path)[-1]
    assert last.name == "step_000004"  # the stop is checkpointed
    assert torch.load(last / "state.pt", weights_only=False)["extra"]["mine"] == 7


def test_samples_are_logged_and_a_task_without_them_logs_none(tmp_path, capsys):
    run(tmp_path / "talking", TalkingRegression())
    assert capsys.readouterr().out.count("sample: '4 tokens of text'") == 3
    run(tmp_path / "quiet", Regression())  # the Task default: sample() is None
    assert "sample:" not in capsys.readouterr().out
    run(tmp_path / "off", TalkingRegression(), train={"sample_tokens": 0})
    assert "sample:" not in capsys.readouterr().out


def test_throughput_gives_the_logged_mfu(tmp_path):
    assert Throughput().mfu(1000.0, 1) == 0.0
    assert Throughput(flops_per_token=6, peak_flops=1e4).mfu(1000.0, 2) == pytest.approx(0.3)
    _, _, records = run(tmp_path, throughput=Throughput(flops_per_token=6, peak_flops=1e4))
    train = [r for r in records if r["split"] == "train"]
    assert all(r["mfu"] == pytest.approx(r["tokens_per_s"] * 6 / 1e4) for r in train)


def test_the_time_limit_stops_with_a_checkpoint(tmp_path):
    result, _, records = run(tmp_path, train={"time_limit_minutes": 1e-9})
    assert result.stopped_by == "time_limit" and result.step == 0
    assert records == []  # no step taken, nothing to evaluate
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000"]
    assert StopFlag("SIGTERM").agree(False, torch.device("cpu")) == "SIGTERM"  # a caught signal wins


def test_a_start_from_a_checkpoint_ends_like_the_whole_run(tmp_path):
    _, whole, _ = run(tmp_path / "whole", train={"max_steps": 6})
    run(tmp_path / "parts", train={"max_steps": 3})  # stands in for a run stopped at step 3
    result, resumed, _ = run(tmp_path / "parts", start=Start(3, 3 * 8 * 4), train={"max_steps": 6})
    assert result.step == 6 and result.tokens_seen == 6 * 8 * 4
    assert torch.equal(resumed.weight, whole.weight) and torch.equal(resumed.bias, whole.bias)


# ------------------------------------------------------------------ the parallel helpers on one process


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.norm = torch.nn.LayerNorm(4)


def test_full_state_dict_keeps_ties_and_trainable_only_copies():
    module = Tied()
    module.norm.requires_grad_(False)
    state = full_state_dict(module)
    assert set(state) == {"embed.weight", "head.weight", "norm.weight", "norm.bias"}
    assert state["head.weight"] is state["embed.weight"]  # one tensor, as a saver must see the tie
    trainable = full_state_dict(module, trainable_only=True)
    assert set(trainable) == {"embed.weight"}
    assert trainable["embed.weight"].data_ptr() != module.embed.weight.data_ptr()  # a copy
    with torch.no_grad():
        module.embed.weight.zero_()
    load_full_state_dict(module, trainable, strict=False)
    assert torch.equal(module.head.weight, trainable["embed.weight"])


def test_gradient_norm_clips_like_torch_and_the_contexts_are_no_ops():
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)
    module(torch.randn(5, 4)).square().sum().backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in module.parameters()]).item()
    assert gradient_norm(module.parameters()) == pytest.approx(expected)
    assert gradient_norm(module.parameters(), clip=1e-3) == pytest.approx(
        expected
    )  # the norm before clipping
    assert torch.nn.utils.get_total_norm([p.grad for p in module.parameters()]).item() == pytest.approx(1e-3)
    assert gradient_norm(torch.nn.Linear(2, 2).parameters()) == 0.0  # no gradients yet
    with gathered(module), gradient_sync(module, enabled=False):
        assert module.weight.shape == (3, 4)
