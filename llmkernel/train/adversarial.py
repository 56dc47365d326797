"""Adversarial training on the input embeddings: FGM, PGD and FreeLB, as the loop's `backward` step.

Each method perturbs the output of the model's input-embedding layer (a forward hook adds `delta`, shape
(batch, length, width)) in the direction that raises the loss, and trains on the perturbed passes too.
Sizes are relative and per example: `epsilon` 0.05 is a perturbation whose L2 norm over the whole
(length, width) sequence is 5% of that sequence's embeddings' norm, so one setting fits any model's
embedding scale and any sequence length (Miyato et al. scale to normalised embeddings for the same reason).
The hook works under every method (full, top_layers, LoRA: the embeddings may be frozen, the gradient
w.r.t. `delta` still exists) and task.

* FGM (Miyato et al. 2017): one step of size epsilon along the normalised gradient; clean + adversarial loss.
* PGD (Madry et al. 2018): K normalised ascent steps of `step_size`, projected into the epsilon ball;
  clean + loss at the last perturbation.
* FreeLB (Zhu et al. 2020): K ascent steps from a small random start, the gradients of all K perturbed
  passes averaged ("free" adversarial training: no separate clean pass).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

ADVERSARIAL_METHODS = ("none", "fgm", "pgd", "freelb")


class EmbeddingPerturbation:
    """Adds `delta` to the input embeddings' output while active; a no-op otherwise."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.delta: torch.Tensor | None = None
        self.handle = model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if self.delta is None or self.delta.shape != output.shape:
            return output
        return output + self.delta.to(output.dtype)

    @contextlib.contextmanager
    def active(self, delta: torch.Tensor) -> Iterator[torch.Tensor]:
        self.delta = delta
        try:
            yield delta
        finally:
            self.delta = None

    def zeros(self, batch: dict[str, torch.Tensor], width: int) -> torch.Tensor:
        ids = batch["input_ids"]
        return torch.zeros(*ids.shape, width, device=ids.device, requires_grad=True)


def _normalised(gradient: torch.Tensor) -> torch.Tensor:
    """gradient / its L2 norm per example (batch, length, width)."""
    norm = gradient.flatten(1).norm(dim=1).clamp(min=1e-12)
    return gradient / norm.view(-1, 1, 1)


def _project(delta: torch.Tensor, epsilon: float | torch.Tensor) -> torch.Tensor:
    """Scale each example's perturbation back into the L2 ball of radius epsilon (a number, or one per
    example shaped (batch, 1, 1); 0: no bound)."""
    radius = torch.as_tensor(epsilon, dtype=delta.dtype, device=delta.device).reshape(-1)
    if not bool((radius > 0).any()):
        return delta
    norm = delta.flatten(1).norm(dim=1).clamp(min=1e-12)
    return delta * (radius / norm).clamp(max=1.0).view(-1, 1, 1)


class Adversary:
    """The loop's `backward(compute_loss, scale, batch)` for one adversarial method."""

    def __init__(self, model: torch.nn.Module, method: str, epsilon: float, step_size: float, steps: int):
        self.method, self.epsilon, self.step_size, self.steps = method, epsilon, step_size, steps
        self.embedding = model.get_input_embeddings()
        self.width = self.embedding.weight.shape[1]
        self.perturbation = EmbeddingPerturbation(model)

    def __call__(
        self, compute_loss: Callable[[], torch.Tensor], scale: float, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        with torch.no_grad():  # (batch, 1, 1): each sequence's embedding norm, padding left out
            embeds = self.embedding(batch["input_ids"]).float()
            if "attention_mask" in batch:
                embeds = embeds * batch["attention_mask"].unsqueeze(-1)
            norms = embeds.flatten(1).norm(dim=1).clamp(min=1e-6).view(-1, 1, 1)
        return getattr(self, self.method)(compute_loss, scale, batch, norms)

    def fgm(self, compute_loss, scale: float, batch, norms: torch.Tensor) -> torch.Tensor:
        with self.perturbation.active(self.perturbation.zeros(batch, self.width)) as delta:
            loss = compute_loss()
            (loss * scale).backward()
        attack = self.epsilon * norms * _normalised(delta.grad)
        with self.perturbation.active(attack):
            (compute_loss() * scale).backward()
        return loss

    def pgd(self, compute_loss, scale: float, batch, norms: torch.Tensor) -> torch.Tensor:
        with self.perturbation.active(self.perturbation.zeros(batch, self.width)) as delta:
            loss = compute_loss()
            (loss * scale).backward()
        gradient, attack = delta.grad, torch.zeros_like(delta)
        for step in range(self.steps):
            attack = attack + self.step_size * norms * _normalised(gradient)
            attack = _project(attack, self.epsilon * norms).detach()
            if step < self.steps - 1:  # the ascent direction at the new point, without touching weight grads
                attack.requires_grad_(True)
                with self.perturbation.active(attack):
                    (gradient,) = torch.autograd.grad(compute_loss(), attack)
        with self.perturbation.active(attack.detach()):
            (compute_loss() * scale).backward()
        return loss

    def freelb(self, compute_loss, scale: float, batch, norms: torch.Tensor) -> torch.Tensor:
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).unsqueeze(-1).float()
        lengths = mask.sum(dim=(1, 2)).clamp(min=1).view(-1, 1, 1)
        start = (torch.rand(*batch["input_ids"].shape, self.width, device=mask.device) * 2 - 1) * mask
        delta = (start * self.step_size * norms / torch.sqrt(lengths * self.width)).requires_grad_(True)
        first = None
        for _ in range(self.steps):
            with self.perturbation.active(delta):
                loss = compute_loss()
                (loss * scale / self.steps).backward()
            first = loss if first is None else first
            delta = delta + self.step_size * norms * _normalised(delta.grad) * mask
            delta = _project(delta, self.epsilon * norms)
            delta = delta.detach().requires_grad_(True)
        return first
