"""Checkpoints: atomic, the last K kept, with model, optimizer, scheduler, RNG states and the data position.

A checkpoint is a folder `checkpoints/step_000123/` holding `state.pt` and the resolved `config.json`,
written through a staging folder so a killed run never leaves a checkpoint that looks complete. The data
position is the step itself: batches are a deterministic function of (seed, step, rank), so a resumed
run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from llmkernel import dist
from llmkernel.errors import ConfigError
from llmkernel.runs import atomic_write_json, is_up_to_date, staging_folder

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.pt"


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: dict[str, Any],
    extra: dict[str, Any],
    keep: int,
    rank_info: dist.DistInfo,
) -> Path | None:
    """Save a checkpoint for `step` (collective: every rank calls it; rank 0 writes). Returns its folder.

    The model and optimizer states are saved whole (FSDP's shards gathered onto rank 0's CPU), so a run can
    resume on another number of processes; each rank's RNG state is kept.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    rng = dist.all_gather_object(_rng_state())
    folder = Path(out) / CHECKPOINTS / f"step_{step:06d}"
    if rank_info.is_main:
        state = {
            "step": step,
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "rng": rng,
            "extra": extra,
        }
        with staging_folder(folder) as stage:
            torch.save(state, stage / STATE_FILE)
            atomic_write_json(stage / "config.json", config)
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return folder


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints in `out`, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())


def load_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank_info: dist.DistInfo,
) -> dict[str, Any]:
    """Restore everything saved by `save_checkpoint`; returns {"step": ..., "extra": ...}.

    Collective: every rank reads the whole state and keeps its part (its FSDP shards, its RNG state).
    """
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    _set_rng_state(rng[rank_info.rank] if rank_info.rank < len(rng) and rng[rank_info.rank] else rng[0])
    return {"step": state["step"], "extra": state.get("extra", {})}


RUN_FILES = (CHECKPOINTS, "tb", "metrics.jsonl", "run.json")


def open_output(
    out: Path, stage: str, run_fingerprint: str, resume: bool, force: bool, rank_info: dist.DistInfo
) -> list[Path] | None:
    """Decide what a training stage does with `out`: None when it is up to date (nothing to do), else the
    checkpoints to resume from ([] for a fresh start). --force clears an earlier run's files."""
    checkpoints = list_checkpoints(out)
    if not (force or resume) and is_up_to_date(out, stage, run_fingerprint):
        dist.print0(f"{out} is up to date (same config and data); nothing to do. Use --force to train again.")
        return None
    if checkpoints and not (resume or force):
        raise ConfigError(
            f"{out} holds checkpoints of an earlier run: pass --resume to continue it or --force to start over"
        )
    if resume and not checkpoints:
        raise ConfigError(f"--resume: no checkpoint in {out / CHECKPOINTS}; drop --resume to start a new run")
    if force and rank_info.is_main:
        for name in RUN_FILES:
            target = Path(out) / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    dist.barrier()
    return [] if force else checkpoints
