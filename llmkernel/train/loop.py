"""The one training loop, shared by pretraining and every fine-tuning task.

Read it top to bottom: each iteration evaluates (when due), checkpoints (when due), stops (when asked),
then takes one optimizer step over `grad_accum` micro-batches and logs. Tasks plug in their batches, loss,
evaluation and samples (`llmkernel.tasks.base.Task`); a stage plugs in its hooks (`LoopHooks`: the backward
pass, what to do with each evaluation, extra checkpoint state); distribution, precision and checkpoints are
the same for all. Every rank runs every part of an iteration (evaluation, samples and checkpoint state
dicts are collective under FSDP); only rank 0 writes files and logs.

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
from typing import Any

import torch

from llmkernel import dist
from llmkernel.tasks.base import Task
from llmkernel.train.checkpoint import save_checkpoint
from llmkernel.train.config import TrainConfig
from llmkernel.train.logger import TrainLogger
from llmkernel.train.parallel import gathered, gradient_norm, gradient_sync


def plain_backward(
    compute_loss: Callable[[], torch.Tensor], scale: float, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """One forward and backward pass; returns the (unscaled) summed loss.

    Adversarial training (llmkernel.train.adversarial) replaces this with extra perturbed passes.
    """
    loss_sum = compute_loss()
    (loss_sum * scale).backward()
    return loss_sum


@dataclass(frozen=True)
class Start:
    """Where the loop begins: step 0 of a new run, or a checkpoint's step and token count (--resume)."""

    step: int = 0
    tokens_seen: int = 0


@dataclass(frozen=True)
class Throughput:
    """What the logged model FLOPs utilisation (mfu) is measured against; 0s log an mfu of 0."""

    flops_per_token: int = 0  # training FLOPs (forward and backward) per token of the model
    peak_flops: float = 0.0  # one process's measured matmul peak, FLOP/s

    def mfu(self, tokens_per_s: float, world_size: int) -> float:
        if not self.peak_flops:
            return 0.0
        return tokens_per_s * self.flops_per_token / (self.peak_flops * world_size)


@dataclass(frozen=True)
class LoopHooks:
    """What a stage adds to the loop.

    `backward(compute_loss, scale, batch)` runs the passes of one micro-batch (plain, or adversarial:
    llmkernel.train.adversarial). `on_evaluate(step, metrics)` sees every evaluation (fine-tuning keeps
    the best model there; collective: every rank calls it) and returns True to stop early.
    `extra_state()` adds its state to every checkpoint.
    """

    backward: Callable[..., torch.Tensor] = plain_backward
    on_evaluate: Callable[[int, dict[str, float]], bool] | None = None
    extra_state: Callable[[], dict[str, Any]] | None = None


@dataclass
class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checkpoints at the next step boundary and returns."""

    signal_name: str | None = None  # the signal this process caught

    def install(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            self.signal_name = signal.Signals(signum).name

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handler)

    def agree(self, out_of_time: bool, device: torch.device) -> str | None:
        """The stop every rank takes at this step boundary: a signal any rank caught (the highest number,
        so SIGTERM over SIGINT), else "time_limit" if any rank's clock passed it, else None. Collective:
        a signal reaches the ranks at slightly different times, and one rank leaving the loop alone would
        leave the others waiting."""
        number = signal.Signals[self.signal_name].value if self.signal_name else 0
        votes = dist.all_reduce_max(torch.tensor([number, int(out_of_time)], device=device))
        if votes[0]:
            return signal.Signals(int(votes[0])).name
        return "time_limit" if votes[1] else None


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
    grad_clip: float,
    out: Path,
    run_config: dict[str, Any],
    rank_info: dist.DistInfo,
    logger: TrainLogger,
    stop: StopFlag,
    start: Start = Start(),
    throughput: Throughput = Throughput(),
    hooks: LoopHooks = LoopHooks(),
    autocast_dtype: torch.dtype | None = None,
) -> LoopResult:
    """Train from `start.step` to `config.max_steps` (or a stop); returns where it ended and the last metrics.

    `model` is the plain model (evaluation, samples, gradient clipping); `train_module` is what the forward
    pass runs (the model, a task wrapper around it (`task.wrap`), and/or DDP/FSDP around that).
    """
    device = rank_info.device
    step, tokens_seen = start.step, start.tokens_seen
    started = time.perf_counter()
    window_started, window_tokens, window_samples, window_loss, window_count = started, 0, 0, 0.0, 0
    result = LoopResult(step=step, tokens_seen=tokens_seen, stopped_by=None)
    last_eval = last_checkpoint = start.step

    def checkpoint() -> None:
        extra = {"tokens_seen": tokens_seen, "val_metrics": result.val_metrics}
        if hooks.extra_state is not None:
            extra.update(hooks.extra_state())
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
            result.val_metrics = _evaluate(task, model, train_module, rank_info, logger, step, config)
            last_eval = step
            if hooks.on_evaluate is not None and hooks.on_evaluate(step, result.val_metrics):
                result.stopped_by = "early_stopping"
        # 2. checkpoint
        if step > last_checkpoint and config.checkpoint_every and step % config.checkpoint_every == 0:
            checkpoint()
            last_checkpoint = step
        # 3. stop? (a signal, the time limit or early stopping; every rank takes the same decision)
        elapsed_minutes = (time.perf_counter() - started) / 60
        out_of_time = bool(config.time_limit_minutes) and elapsed_minutes >= config.time_limit_minutes
        result.stopped_by = stop.agree(out_of_time, device) or result.stopped_by
        if step >= config.max_steps or result.stopped_by:
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
            # reduce gradients over ranks only on the last micro-batch of the step
            with gradient_sync(train_module, enabled=index == len(batches) - 1):

                def compute_loss(batch: dict[str, torch.Tensor] = batch) -> torch.Tensor:
                    with _autocast(device, autocast_dtype):
                        return task.loss(train_module, batch)

                loss_sum = hooks.backward(compute_loss, scale, batch)
            loss_total += loss_sum.detach().double()
        loss_total = dist.all_reduce_sum(loss_total).item()
        grad_norm = gradient_norm(model.parameters(), grad_clip)  # clipped first when grad_clip > 0
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
                    "grad_norm": grad_norm,
                    "tokens_per_s": tokens_per_s,
                    "mfu": throughput.mfu(tokens_per_s, rank_info.world_size),
                    "samples_per_s": window_samples / seconds,
                    "tokens": tokens_seen,
                },
            )
            window_started, window_tokens, window_samples, window_loss, window_count = now, 0, 0, 0.0, 0
        logger.advance()

    if step > last_eval and result.stopped_by in (None, "time_limit"):
        result.val_metrics = _evaluate(task, model, train_module, rank_info, logger, step, config)
        if hooks.on_evaluate is not None:
            hooks.on_evaluate(step, result.val_metrics)
    if step > last_checkpoint or not (out / "checkpoints").is_dir():
        checkpoint()
    result.step, result.tokens_seen = step, tokens_seen
    return result


def train(
    *,
    task: Task,
    model: torch.nn.Module,
    train_module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: TrainConfig,
    grad_clip: float,
    out: Path,
    run_config: dict[str, Any],
    rank_info: dist.DistInfo,
    progress: bool,
    start: Start = Start(),
    throughput: Throughput = Throughput(),
    hooks: LoopHooks = LoopHooks(),
) -> LoopResult:
    """`run_loop` with what every training stage puts around it: SIGINT/SIGTERM caught (a checkpoint, then
    a clean return), the logger (progress bar, metrics.jsonl, TensorBoard), autocast chosen for the device.
    After a signal it says how to continue."""
    from llmkernel.runtime import autocast_dtype_for

    stop = StopFlag()
    stop.install()
    logger = TrainLogger(out, config.max_steps, start.step, rank_info.is_main, progress)
    try:
        result = run_loop(
            task=task,
            model=model,
            train_module=train_module,
            optimizer=optimizer,
            scheduler=scheduler,
            config=config,
            grad_clip=grad_clip,
            out=out,
            run_config=run_config,
            rank_info=rank_info,
            logger=logger,
            stop=stop,
            start=start,
            throughput=throughput,
            hooks=hooks,
            autocast_dtype=autocast_dtype_for(config.dtype, rank_info.device),
        )
    finally:
        logger.close()
    if result.stopped_by in ("SIGINT", "SIGTERM"):
        dist.print0(
            f"stopped by {result.stopped_by} at step {result.step}; checkpoint saved. Continue with --resume."
        )
    return result


def _evaluate(
    task: Task,
    model: torch.nn.Module,
    train_module: torch.nn.Module,
    rank_info: dist.DistInfo,
    logger: TrainLogger,
    step: int,
    config: TrainConfig,
) -> dict[str, float]:
    """Validation metrics and the task's sample (decoders; None for the others), logged by rank 0.

    Every rank runs both, with FSDP's weights gathered whole for them (`gathered`).
    """
    model.eval()
    with gathered(train_module):
        metrics = task.evaluate(model, rank_info.device, rank_info.rank, rank_info.world_size)
        text = task.sample(model, rank_info.device, config.sample_tokens) if config.sample_tokens else None
    logger.log(step, "val", metrics)
    logger.write(f"step {step}: " + ", ".join(f"val {k} {v:.4f}" for k, v in metrics.items()))
    if text is not None:
        logger.text(step, "sample", text)
        logger.write(f"sample: {text[:300]!r}")
    model.train()
    return metrics
