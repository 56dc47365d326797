"""AdamW with decay on matrices only, and the learning-rate schedules (warmup + cosine / WSD / constant)."""

from __future__ import annotations

import math

import torch

from llmkernel.train.config import OptimConfig


def build_optimizer(model: torch.nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW where only matrices (dim >= 2: linear weights, embeddings) get weight decay.

    Norm gains and biases are left undecayed, as in GPT-3 and Llama. The fused (or foreach) kernel is used
    where PyTorch has one for the device.
    """
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    device_type = next(model.parameters()).device.type
    kwargs = {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, **kwargs
    )


def lr_multiplier(step: int, max_steps: int, config: OptimConfig) -> float:
    """Learning rate at optimizer step `step` (0-based) as a multiple of the peak."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    floor = config.min_lr_ratio
    if config.schedule == "constant":
        return 1.0
    if (
        config.schedule == "wsd"
    ):  # warmup-stable-decay (Hu et al. 2024, MiniCPM): flat, then linear to the floor
        decay_start = max(config.warmup_steps, int(max_steps * (1 - config.decay_fraction)))
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, max_steps - decay_start)
        return 1.0 - (1.0 - floor) * min(1.0, progress)
    progress = (step - config.warmup_steps) / max(1, max_steps - config.warmup_steps)
    if config.schedule == "linear":  # BERT's fine-tuning schedule (Devlin et al. 2019)
        return 1.0 - (1.0 - floor) * min(1.0, progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, max_steps: int, config: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, max_steps, config))
