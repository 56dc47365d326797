"""`llmk distill`: a smaller student learns a task from a teacher's softened predictions.

The loss of each prediction (a text's label, a word's tag, an assistant token) mixes the task's own loss
with the Kullback-Leibler divergence between the teacher's and the student's distributions at temperature
T, scaled by T^2 so its gradients keep their size as T changes (Hinton et al. 2015, "Distilling the
Knowledge in a Neural Network"):

    loss = (1 - w) * task_loss + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))

It is fine-tuning with a different loss, so it runs `train.finetune` as a `Variant`: the same data
reading, defaults, loop, checkpoints, resume, best-model keeping and report; the task object is wrapped,
not copied. `llmk prune --recover.steps N` uses the same wrapper with the unpruned model as the teacher.

Left out: caching the teacher's top-k logits (the teacher's forward costs about a third of a student
step here), hidden-state matching.

This module sits in `compress` rather than `train` (DESIGN.md lists `llmk distill` under train) because it
writes compress.json through `compress.measure`; `compress` -> `train` is the one allowed direction.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmkernel.compress.common import MODEL_FILES
from llmkernel.compress.config import DistillConfig, MeasureConfig
from llmkernel.compress.measure import compare, measure, summary_line, write_compress_json
from llmkernel.config import to_dict
from llmkernel.errors import InputError
from llmkernel.models.loading import load_model, load_tokenizer_for, model_kind, resolve_model
from llmkernel.tasks.base import IGNORE, SupervisedTask, Task
from llmkernel.train.config import FinetuneConfig
from llmkernel.train.finetune import Variant, finetune

STAGE = "distill"


class Distillation(Task):
    """The loop's task: the data's task with the teacher's logits mixed into its loss.

    The student's forward is the task's own (through `task.wrap`); a hook on that module keeps its
    output and arguments, and the teacher runs the same call without gradients, so both give logits
    for the same predictions whatever shape the task's head has (a row per text, per token, or only
    the assistant's positions).
    """

    def __init__(self, task: SupervisedTask, teacher: torch.nn.Module, temperature: float, weight: float):
        self.task, self.temperature, self.weight = task, temperature, weight
        self.teacher = task.wrap(teacher.eval().requires_grad_(False))
        self.name = task.name
        self._call: tuple[tuple, dict, Any] | None = None

    def micro_batches(self, step: int, count: int, rank: int, world_size: int):
        return self.task.micro_batches(step, count, rank, world_size)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return self.task.count(batch)

    def evaluate(self, model, device, rank: int, world_size: int) -> dict[str, float]:
        return self.task.evaluate(model, device, rank, world_size)

    def sample(self, model, device, max_new_tokens: int) -> str | None:
        return self.task.sample(model, device, max_new_tokens)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        module = self.task.wrap(model)

        def keep(_module, args, kwargs, output) -> None:
            self._call = (args, kwargs, output)

        module.register_forward_hook(keep, with_kwargs=True)
        return module

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self._call = None
        task_loss = self.task.loss(model, batch)
        if self._call is None or self.weight == 0:
            return task_loss
        args, kwargs, output = self._call
        with torch.no_grad():
            teacher = _logits(self.teacher(*args, **kwargs))
        student = _logits(output)
        rows = _predicted(batch["labels"], student)
        t = self.temperature
        divergence = F.kl_div(
            F.log_softmax(student[rows].float() / t, dim=-1),
            F.log_softmax(teacher[rows].float() / t, dim=-1),
            log_target=True,
            reduction="sum",
        )
        return (1 - self.weight) * task_loss + self.weight * t * t * divergence


def _logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def _predicted(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Which rows of `logits` ([..., classes]) are predictions with a loss (labels that are not IGNORE)."""
    if logits.shape[:-1] != labels.shape:
        raise RuntimeError(f"cannot pair logits {tuple(logits.shape)} with labels {tuple(labels.shape)}")
    return labels != IGNORE


def hold_zeros(model: torch.nn.Module) -> int:
    """Keep the zeroed weights of the blocks' Linear layers at zero while training: their gradients are
    masked (AdamW then never moves them: zero moments give zero updates, and decoupled decay of a zero is
    zero), so no step has to zero them again. Returns how many are held."""
    from llmkernel.compress.pruning import block_linears
    from llmkernel.compress.sparsity import zero_masks

    masks, linears = zero_masks(model), block_linears(model)
    for name, zeros in masks.items():
        if zeros.any():
            keep = ~zeros
            linears[name].weight.register_hook(lambda grad, keep=keep: grad * keep)
    return sum(int(zeros.sum()) for zeros in masks.values())


def check_pair(teacher: Path, student: Path) -> str:
    """The kind both models share; InputError for another kind or another tokenizer."""
    kinds = model_kind(teacher), model_kind(student)
    if kinds[0] != kinds[1]:
        raise InputError(
            f"the teacher is a {kinds[0]} and the student a {kinds[1]}; distill between models of one kind"
        )
    # compress.json's speed measurement feeds random ids, which hold no entity markers
    if kinds[0] == "relation_classifier":
        raise InputError(
            f"{teacher}: a relation model; llmk distill (like prune and quantize) does not take relation models"
        )
    vocabularies = (load_tokenizer_for(teacher).get_vocab(), load_tokenizer_for(student).get_vocab())
    if vocabularies[0] != vocabularies[1]:
        raise InputError(
            f"{student}: its tokenizer differs from the teacher's ({len(vocabularies[1]):,} vs "
            f"{len(vocabularies[0]):,} tokens); the student must share the teacher's tokenizer"
        )
    return kinds[0]


def distillation_variant(
    stage: str,
    run_config: dict[str, Any],
    teacher_folder: Path,
    temperature: float,
    weight: float,
    measure_config: MeasureConfig,
    document: dict[str, Any] | None = None,
    keep_zeros: bool = False,
) -> Variant:
    """Fine-tuning as distillation from `teacher_folder`, with compress.json (teacher vs student) written
    beside the model; `document` adds what the caller knows (e.g. how the student was pruned);
    `keep_zeros` holds the student's zero weights at zero (unstructured pruning's recovery)."""
    kind = model_kind(teacher_folder)
    teacher = load_model(teacher_folder, kind).eval()

    def loop_task(task: SupervisedTask, model: torch.nn.Module, device: torch.device) -> Distillation:
        names = [str(teacher.config.id2label[i]) for i in range(len(teacher.config.id2label))]
        if task.names and names and names != [str(n) for n in task.names]:
            raise InputError(
                f"{teacher_folder}: the teacher's labels ({', '.join(names)}) are not the data's "
                f"({', '.join(map(str, task.names))}); give data of the teacher's task"
            )
        if keep_zeros:
            print(f"recovery holds {hold_zeros(model):,} pruned weights at zero")
        return Distillation(task, teacher.to(device), temperature, weight)

    def write_more(out: Path, model: torch.nn.Module, task: SupervisedTask) -> dict[str, Any]:
        tokenizer = load_tokenizer_for(teacher_folder)
        model = model.cpu().eval()
        before = measure(teacher.cpu(), tokenizer, kind, teacher_folder, measure_config)
        after = measure(model, tokenizer, kind, out, measure_config)
        comparison = compare(kind, before, after)
        write_compress_json(
            out,
            {
                "stage": stage,
                "source_model": str(teacher_folder),
                **(document or {}),
                "source": before,
                "result": after,
                "comparison": comparison,
            },
        )
        print(summary_line(stage, comparison))
        return {k: v for k, v in comparison.items() if isinstance(v, int | float)}

    more = [teacher_folder / name for name in MODEL_FILES if (teacher_folder / name).is_file()]
    return Variant(stage, run_config, more, loop_task, write_more)


def distill(config: DistillConfig) -> dict[str, Any]:
    """Run `llmk distill`; returns the final metrics (also in run.json)."""
    for path in (config.data.train, config.data.eval, config.measure.eval):
        if path and not Path(path).is_file():
            raise InputError(f"{path}: no such file")
    teacher, student = resolve_model(config.teacher), resolve_model(config.student)
    check_pair(teacher, student)
    measure_config = config.measure
    if not measure_config.eval and config.data.eval:
        measure_config = dataclasses.replace(measure_config, eval=config.data.eval)
    tune = FinetuneConfig(
        task=config.task,
        model=str(student),
        out=config.out,
        method="full",
        epochs=config.epochs,
        data=config.data,
        train=config.train,
        optim=config.optim,
        resume=config.resume,
        force=config.force,
        progress=config.progress,
    )
    variant = distillation_variant(
        STAGE, to_dict(config), teacher, config.temperature, config.distill_weight, measure_config
    )
    return finetune(tune, variant)
