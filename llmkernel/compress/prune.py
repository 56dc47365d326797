"""`llmk prune`: remove what a model needs least, measured on a calibration file, then optionally recover.

Read top to bottom: check the inputs, load and measure the source, measure importance on the
calibration examples (`compress.pruning`), prune a copy — structured (FFN neurons, attention heads, whole
layers: a stock HF config that runs faster) or unstructured (weights set to zero: the same dense shapes,
so no faster on a CPU's dense kernels; the command says so) — then either save and measure it, or recover:
fine-tune the pruned model by distillation from the unpruned one (`compress.distill`, the one loop), the
zeros of unstructured pruning held at zero.
"""

from __future__ import annotations

import dataclasses
import shutil
from typing import Any

import torch

from llmkernel import tasks
from llmkernel.compress.common import Job, calibration_batches, finished_metrics, open_job
from llmkernel.compress.config import PruneConfig
from llmkernel.compress.distill import distillation_variant
from llmkernel.compress.measure import compare, measure, summary_line
from llmkernel.config import to_dict
from llmkernel.errors import InputError
from llmkernel.models.loading import load_model, load_tokenizer_for
from llmkernel.models.quantized import is_quantized
from llmkernel.runs import staging_folder
from llmkernel.runtime import configure_threads
from llmkernel.train.config import FinetuneConfig
from llmkernel.train.finetune import finetune

STAGE = "prune"
UNSTRUCTURED_NOTE = (
    "unstructured sparsity keeps the dense shapes: dense CPU kernels run it no faster "
    "(the zeros pay off in compressed storage or sparse kernels, not here)"
)


def prune(config: PruneConfig) -> dict[str, Any]:
    """Run `llmk prune`; returns the metrics (also in run.json)."""
    recover = config.recover
    files = [config.calibration, recover.data.train, recover.data.eval, config.measure.eval]
    job = open_job(STAGE, config, config.model, files)
    if job is None:
        return finished_metrics(config.out)
    if is_quantized(job.source):
        raise InputError(f"{job.source} is quantized; prune its floating-point source, then quantize")
    from llmkernel.compress import pruning

    configure_threads(config.threads, 1)
    torch.manual_seed(0)
    tokenizer = load_tokenizer_for(job.source)
    model = load_model(job.source, job.kind).eval()
    try:
        architecture = pruning.check_architecture(model)
    except ValueError as error:
        raise InputError(f"{job.source}: {error}") from None
    calibration = config.calibration or recover.data.train or config.measure.eval
    needs_activations = config.method == "structured" or config.criterion == "wanda"
    if needs_activations and not calibration:
        raise InputError(
            "calibration: importance is measured on examples; pass --calibration FILE (or --recover.data.train)"
        )
    print(f"measuring the source model {job.source} ...")
    before = measure(model, tokenizer, job.kind, job.source, config.measure)

    batches = []
    if needs_activations:
        batches = calibration_batches(model, tokenizer, job.kind, calibration, config.calibration_samples)
    try:
        method = _prune_in_place(model, batches, config, pruning)
    except ValueError as error:
        raise InputError(f"{job.source}: {error}") from None
    method["architecture"] = architecture
    shown = {k: v for k, v in method.items() if k not in ("architecture", "layers", "weights", "target")}
    print("pruned: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
    if config.method == "unstructured":
        print(UNSTRUCTURED_NOTE)
    if recover.steps:
        return _recover(job, config, model, tokenizer, method)

    with staging_folder(job.out) as stage:
        model.save_pretrained(stage, safe_serialization=True)
        tokenizer.save_pretrained(stage)
        result = load_model(stage, job.kind).eval()  # measured as every stage loads it
        after = measure(result, tokenizer, job.kind, stage, config.measure)
        comparison = compare(job.kind, before, after)
        notes = [UNSTRUCTURED_NOTE] if config.method == "unstructured" else []
        document = {
            "method": method,
            "source": before,
            "result": after,
            "comparison": comparison,
            "notes": notes,
        }
        metrics = {k: v for k, v in comparison.items() if isinstance(v, int | float)}
        job.finish(stage, document, metrics)
    print(summary_line(STAGE, comparison))
    print(f"pruned model, compress.json and run.json written to {job.out}")
    return metrics


def _prune_in_place(model, batches: list, config: PruneConfig, pruning) -> dict[str, Any]:
    """Prune `model` as asked; importance is measured again after each structural step (the layers and
    sizes it ranks change)."""
    importance = pruning.measure_importance(model, batches, config.layer_criterion) if batches else None
    if config.method == "unstructured":
        from llmkernel.compress.sparsity import sparsify

        report = sparsify(
            model, config.sparsity, method=config.criterion, scope=config.scope, importance=importance
        )
        return {"method": "unstructured", "criterion": config.criterion, "scope": config.scope, **report}
    method: dict[str, Any] = {"method": "structured"}
    if config.layers:  # one layer at a time, measured again after each: what is left changes what matters
        remaining, dropped = list(range(model.config.num_hidden_layers)), []
        for _ in range(config.layers):
            (index,) = pruning.prune_layers(model, 1, importance)
            dropped.append(remaining.pop(index))
            importance = pruning.measure_importance(model, batches, config.layer_criterion)
        method["dropped_layers"] = sorted(dropped)
    if config.heads:
        pruning.prune_heads(model, config.heads, importance)
        method["heads"] = config.heads
        importance = pruning.measure_importance(model, batches, config.layer_criterion)
    if config.ffn:
        pruning.prune_ffn(model, config.ffn, importance)
        method["ffn"] = config.ffn
    method["config"] = {
        k: getattr(model.config, k, None)
        for k in ("num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads")
        if getattr(model.config, k, None) is not None
    }
    return method


def recovery_task(kind: str, path: str) -> str:
    """The fine-tuning task that trains a model of `kind` on the file `path`."""
    for name in tasks.FINETUNE_TASKS:
        cls = tasks.task_class(name)
        if cls.model_kind == kind and cls.accepts(path):
            return name
    raise InputError(f"no fine-tuning task trains a {kind} model; recovery takes classify, ner or sft models")


def _recover(job: Job, config: PruneConfig, model, tokenizer, method: dict[str, Any]) -> dict[str, Any]:
    """Save the pruned model beside --out, then distill into it from the source with the one loop."""
    recover = config.recover
    student = job.out.with_name(f".{job.out.name}.pruned")
    shutil.rmtree(student, ignore_errors=True)
    student.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(student, safe_serialization=True)
    tokenizer.save_pretrained(student)
    task = recover.task or recovery_task(job.kind, recover.data.train)
    train = dataclasses.replace(recover.train, max_steps=recover.steps)
    tune = FinetuneConfig(
        task=task,
        model=str(student),
        out=str(job.out),
        method="full",
        data=recover.data,
        train=train,
        optim=recover.optim,
        force=True,
        progress=config.progress,
    )
    measure_config = config.measure
    if not measure_config.eval and recover.data.eval:
        measure_config = dataclasses.replace(measure_config, eval=recover.data.eval)
    variant = distillation_variant(
        STAGE,
        to_dict(config),
        job.source,
        recover.temperature,
        recover.distill_weight,
        measure_config,
        document={"method": {**method, "recovery_steps": recover.steps}},
        keep_zeros=config.method == "unstructured",
    )
    try:
        metrics = finetune(tune, variant)
    finally:
        shutil.rmtree(student, ignore_errors=True)
    print(f"pruned and recovered model, compress.json and run.json written to {job.out}")
    return metrics
