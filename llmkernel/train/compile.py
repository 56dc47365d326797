"""Whether to torch.compile the training step (the decision and why, for the run's first line)."""

from __future__ import annotations

import shutil
import sys

import torch

COMPILE_MIN_STEPS = 300  # compiling costs ~30 s on 2 CPU cores; it pays off past a few hundred steps


def compile_decision(setting: str, device: torch.device, steps: int, static_shapes: bool) -> tuple[bool, str]:
    """Whether to torch.compile the training module, and why (for the run's first line).

    `auto` compiles where it pays: fixed batch shapes (pretraining windows; fine-tuning's padded batches
    change shape every step and would recompile), at least COMPILE_MIN_STEPS steps, and a GPU or a CPU
    with the C++ compiler inductor needs. Measured here on the 4 x 256 Llama of bench/pretrain.py:
    +7.5% tokens/s on 2 CPU cores (inductor fuses RMSNorm, RoPE and SwiGLU's elementwise work).
    """
    compiled = "compiled with torch.compile (the first step takes longer)"
    if setting == "true":
        return True, compiled if static_shapes else f"{compiled}; batch shapes vary, so new ones recompile"
    if setting == "false":
        return False, "not compiled (--train.compile false)"
    if not static_shapes:
        return False, "not compiled: batch shapes vary"
    if steps < COMPILE_MIN_STEPS:
        return False, f"not compiled: under {COMPILE_MIN_STEPS} steps"
    if device.type == "cpu" and (
        sys.platform not in ("linux", "darwin") or not any(shutil.which(c) for c in ("c++", "g++", "clang++"))
    ):
        return False, "not compiled: no C++ compiler found"
    return True, compiled
