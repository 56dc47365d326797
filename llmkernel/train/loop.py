"""The one training loop, shared by pretraining and every fine-tuning task.

Read it top to bottom: each iteration evaluates (when due), checkpoints (when due), stops (when asked),
then takes one optimizer step over `grad_accum` micro-batches and logs. Tasks plug in their batches, loss
and evaluation (the `Task` protocol); distribution, precision and checkpoints are the same for all.

The loss of a step is normalised by the number of predicted tokens in the whole step (all micro-batches,
all ranks), so gradient accumulation and data parallelism give the same update as one big batch.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from llmkernel import dist
from llmkernel.train.checkpoint import save_checkpoint
from llmkernel.train.config import TrainConfig
from llmkernel.train.logger import TrainLogger


class Task(Protocol):
    """What a training task gives the loop."""

    name: str

    def micro_batches(
        self, step: int, count: int, rank: int, world_size: int
    ) -> list[dict[str, torch.Tensor]]:
        """The `count` micro-batches of optimizer step `step` for this rank (a pure function of its arguments)."""

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Number of tokens whose loss `loss` sums for this micro-batch (known before the forward pass)."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the per-token losses of one micro-batch."""

    def evaluate(
        self, model: torch.nn.Module, device: torch.device, rank: int, world_size: int
    ) -> dict[str, float]:
        """Validation metrics (collective: every rank calls it)."""


def plain_backward(
    compute_loss: Callable[[], torch.Tensor], scale: float, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """One forward and backward pass; returns the (unscaled) summed loss.

    Adversarial training (llmkernel.train.adversarial) replaces this with extra perturbed passes.
    """
    loss_sum = compute_loss()
    (loss_sum * scale).backward()
    return loss_sum


@dataclass
class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checkpoints at the next step boundary and returns."""

    signal_name: str | None = None

    def install(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            self.signal_name = signal.Signals(signum).name

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handler)


@dataclass
class LoopResult:
    step: int
    tokens_seen: int
    stopped_by: str | None  # None: finished; "SIGINT"/"SIGTERM"; "time_limit"; "early_stopping"
    train_loss: float | None = None
    val_metrics: dict[str, float] = field(default_factory=dict)
    samples_seen: int = 0  # in this process's run (since the start or the resume)
    train_seconds: float = 0.0  # time in optimizer steps only (no evaluation, no checkpoints)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def run_loop(
    *,
    task: Task,
    model: torch.nn.Module,
    train_module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: TrainConfig,
    out: Path,
    run_config: dict[str, Any],
    rank_info: dist.DistInfo,
    logger: TrainLogger,
    start_step: int,
    tokens_seen: int,
    flops_per_token: int,
    peak_flops: float,
    stop: StopFlag,
    grad_clip: float = 0.0,
    autocast_dtype: torch.dtype | None = None,
    sample: Any = None,
    backward: Callable[..., torch.Tensor] = plain_backward,
    on_evaluate: Callable[[int, dict[str, float]], bool] | None = None,
    extra_state: Callable[[], dict[str, Any]] | None = None,
) -> LoopResult:
    """Train from `start_step` to `config.max_steps` (or a stop); returns where it ended and the last metrics.

    `model` is the plain model (evaluation, samples); `train_module` is what the forward pass runs
    (the model, a task wrapper around it, and/or DDP/FSDP around that). `backward(compute_loss, scale,
    batch)` runs the passes of one micro-batch (plain, or adversarial). `on_evaluate(step, metrics)` sees
    every evaluation (fine-tuning keeps the best model there) and returns True to stop early;
    `extra_state()` adds its state to every checkpoint.
    """
    device = rank_info.device
    step = start_step
    started = time.perf_counter()
    window_started, window_tokens, window_samples, window_loss, window_count = started, 0, 0, 0.0, 0
    result = LoopResult(step=step, tokens_seen=tokens_seen, stopped_by=None)
    last_eval = last_checkpoint = start_step

    def checkpoint() -> None:
        extra = {"tokens_seen": tokens_seen, "val_metrics": result.val_metrics}
        if extra_state is not None:
            extra.update(extra_state())
        save_checkpoint(
            out,
            step,
            train_module,
            optimizer,
            scheduler,
            run_config,
            extra,
            config.keep_checkpoints,
            rank_info,
        )

    while True:
        # 1. evaluate
        if step > last_eval and config.eval_every and step % config.eval_every == 0:
            result.val_metrics = _evaluate(task, model, rank_info, logger, step, sample, config)
            last_eval = step
            if on_evaluate is not None and on_evaluate(step, result.val_metrics):
                result.stopped_by = "early_stopping"
        # 2. checkpoint
        if step > last_checkpoint and config.checkpoint_every and step % config.checkpoint_every == 0:
            checkpoint()
            last_checkpoint = step
        # 3. stop?
        elapsed_minutes = (time.perf_counter() - started) / 60
        if (
            stop.signal_name is None
            and config.time_limit_minutes
            and elapsed_minutes >= config.time_limit_minutes
        ):
            result.stopped_by = "time_limit"
        if step >= config.max_steps or stop.signal_name or result.stopped_by:
            break
        # 4. one optimizer step
        step_started = time.perf_counter()
        model.train()
        batches = task.micro_batches(step, config.grad_accum, rank_info.rank, rank_info.world_size)
        local_count = torch.tensor(float(sum(task.count(batch) for batch in batches)), dtype=torch.float64)
        global_count = max(1.0, dist.all_reduce_sum(local_count.to(device)).item())
        # DDP averages gradients over ranks, so scaling each rank's summed loss by world_size / global_count
        # gives the gradient of the mean loss over every predicted token of the step (all micro-batches, ranks).
        scale = rank_info.world_size / global_count
        loss_total = torch.zeros((), dtype=torch.float64, device=device)
        step_tokens = sum(batch["input_ids"].numel() for batch in batches) * rank_info.world_size
        step_samples = sum(batch["input_ids"].shape[0] for batch in batches) * rank_info.world_size
        for index, batch in enumerate(batches):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            last = index == len(batches) - 1
            # DDP: synchronise gradients only on the last micro-batch of the step.
            sync = (
                contextlib.nullcontext()
                if last or not hasattr(train_module, "no_sync")
                else train_module.no_sync()
            )
            with sync:

                def compute_loss(batch: dict[str, torch.Tensor] = batch) -> torch.Tensor:
                    with _autocast(device, autocast_dtype):
                        return task.loss(train_module, batch)

                loss_sum = backward(compute_loss, scale, batch)
            loss_total += loss_sum.detach().double()
        loss_total = dist.all_reduce_sum(loss_total).item()
        if grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        else:
            grad_norm = _grad_norm(model)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        result.samples_seen += step_samples
        result.train_seconds += time.perf_counter() - step_started
        tokens_seen += step_tokens
        window_tokens += step_tokens
        window_samples += step_samples
        window_loss += loss_total
        window_count += global_count
        result.train_loss = loss_total / global_count
        # 5. log
        if step % config.log_every == 0 or step == config.max_steps:
            now = time.perf_counter()
            seconds = max(now - window_started, 1e-9)
            tokens_per_s = window_tokens / seconds
            logger.log(
                step,
                "train",
                {
                    "loss": window_loss / max(window_count, 1.0),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": tokens_per_s,
                    "mfu": tokens_per_s * flops_per_token / (peak_flops * rank_info.world_size)
                    if peak_flops
                    else 0.0,
                    "samples_per_s": window_samples / seconds,
                    "tokens": tokens_seen,
                },
            )
            window_started, window_tokens, window_samples, window_loss, window_count = now, 0, 0, 0.0, 0
        logger.advance()

    result.stopped_by = stop.signal_name or result.stopped_by
    if step > last_eval and result.stopped_by in (None, "time_limit"):
        result.val_metrics = _evaluate(task, model, rank_info, logger, step, sample, config)
        if on_evaluate is not None:
            on_evaluate(step, result.val_metrics)
    if step > last_checkpoint or not (out / "checkpoints").is_dir():
        checkpoint()
    result.step, result.tokens_seen = step, tokens_seen
    return result


def train(
    *,
    out: Path,
    progress: bool,
    grad_clip: float,
    rank_info: dist.DistInfo,
    config: TrainConfig,
    **loop_args: Any,
) -> LoopResult:
    """`run_loop` with what every training stage puts around it: SIGINT/SIGTERM caught (a checkpoint, then
    a clean return), the logger (progress bar, metrics.jsonl, TensorBoard), autocast chosen for the device.
    After a signal it says how to continue."""
    from llmkernel.runtime import autocast_dtype_for

    stop = StopFlag()
    stop.install()
    logger = TrainLogger(out, config.max_steps, loop_args["start_step"], rank_info.is_main, progress)
    try:
        result = run_loop(
            out=out,
            config=config,
            rank_info=rank_info,
            logger=logger,
            stop=stop,
            grad_clip=grad_clip,
            autocast_dtype=autocast_dtype_for(config.dtype, rank_info.device),
            **loop_args,
        )
    finally:
        logger.close()
    if result.stopped_by in ("SIGINT", "SIGTERM"):
        dist.print0(
            f"stopped by {result.stopped_by} at step {result.step}; checkpoint saved. Continue with --resume."
        )
    return result


def _grad_norm(model: torch.nn.Module) -> torch.Tensor:
    grads = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.tensor(0.0)


def _evaluate(
    task: Task, model, rank_info: dist.DistInfo, logger: TrainLogger, step: int, sample, config: TrainConfig
):
    model.eval()
    metrics = task.evaluate(model, rank_info.device, rank_info.rank, rank_info.world_size)
    logger.log(step, "val", metrics)
    logger.write(f"step {step}: " + ", ".join(f"val {k} {v:.4f}" for k, v in metrics.items()))
    if sample is not None and config.sample_tokens and rank_info.is_main:
        text = sample(model, rank_info.device, config.sample_tokens)
        if text is not None:  # tasks without samples return None
            logger.text(step, "sample", text)
            logger.write(f"sample: {text[:300]!r}")
    dist.barrier()
    model.train()
    return metrics
