"""`llmk finetune`: adapt a pretrained model to a labeled task with the one training loop.

Read top to bottom: read the data, derive what the user left unset (epochs, learning rate, warmup, max
length) from the data, the method and the model, build the task model, apply the method (full, top
layers, LoRA), train with the loop (adversarial passes as its backward step, the best evaluation kept),
then put the best weights back, evaluate them, and write the output folder:

  OUT/  config.json, model.safetensors, tokenizer files  (LoRA: adapter_config.json + adapter weights;
        with --merge a plain folder and the adapter in adapter/), eval.json (+ confusion_matrix.png),
        checkpoints/, tb/, metrics.jsonl, run.json (written last).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmkernel import dist, tasks
from llmkernel.config import to_dict
from llmkernel.errors import ConfigError, InputError
from llmkernel.models.loading import load_config, load_model, load_tokenizer_for, model_kind, resolve_model
from llmkernel.models.presets import PRESET_MODELS
from llmkernel.runs import (
    Manifest,
    check_writable_parent,
    describe_inputs,
    files_into,
    fingerprint,
    read_manifest,
    staging_folder,
)
from llmkernel.runtime import configure_threads, keep_freed_memory
from llmkernel.tasks.base import SupervisedTask
from llmkernel.tasks.report import save_report
from llmkernel.train.adversarial import Adversary
from llmkernel.train.checkpoint import load_checkpoint, open_output
from llmkernel.train.compile import compile_decision
from llmkernel.train.config import RUN_ONLY_FIELDS, FinetuneConfig
from llmkernel.train.loop import LoopHooks, Start, plain_backward, train
from llmkernel.train.methods import (
    apply_lora,
    freeze_all_but_top_layers,
    is_peft,
    merge_lora,
    trainable_share,
)
from llmkernel.train.optim import build_optimizer, build_scheduler
from llmkernel.train.parallel import full_state_dict, gathered, load_full_state_dict, wrap_for_training

STAGE = "finetune"
TARGET_STEPS = 800  # default epochs aim at about this many optimizer steps (at least 1, at most 10 epochs)
# ... and at least this many per label: with many classes each needs its share of steps. BANKING77 (77
# intents, MiniLM, 313 steps an epoch): 3 epochs (the 800-step target) 0.900 test accuracy, 5 epochs 0.928.
STEPS_PER_LABEL = 20
BEST = "best"
# Peak learning rate of a preset trained from scratch: small Transformers take far more than fine-tuning's
# 1e-4 (Vaswani et al. 2017: a peak of about 7e-4 at width 512; narrower models take more).
FROM_SCRATCH_LR = 1e-3
# ... and its default epochs: a model that starts from nothing needs many passes (seq2seq-small on Tatoeba
# zh->en, 26k pairs: after 2 epochs it still answered every source with the same few generic sentences).
FROM_SCRATCH_EPOCHS = 10.0


@dataclass
class Variant:
    """A stage that is fine-tuning with something added (`llmk distill`, `llmk prune`'s recovery): its name
    and config for run.json, more input files to hash, the task the loop trains (wrapping the data's task and
    the model), and what it writes beside the model (rank 0, before run.json; returns more metrics)."""

    stage: str
    run_config: dict[str, Any]
    more_inputs: list[Path]
    loop_task: Callable[[SupervisedTask, torch.nn.Module, torch.device], Any]
    write_more: Callable[[Path, torch.nn.Module, SupervisedTask], dict[str, Any]] | None = None


def finetune(config: FinetuneConfig, variant: Variant | None = None) -> dict[str, Any]:
    """Run `llmk finetune` (or a `variant` of it); returns the final metrics (also in run.json)."""
    rank_info = dist.init()
    try:
        return _finetune(config, rank_info, variant)
    finally:
        dist.cleanup()


def _finetune(config: FinetuneConfig, rank_info: dist.DistInfo, variant: Variant | None) -> dict[str, Any]:
    started = time.time()
    stage = variant.stage if variant else STAGE
    run_config = variant.run_config if variant else to_dict(config)
    out = Path(config.out)
    check_writable_parent(out)
    for path in (config.data.train, config.data.eval):  # inputs first: a missing file before anything else
        if path and not Path(path).exists():  # a file, or a folder for the embed task's BEIR sets
            raise InputError(
                f"{path}: no such file; pass the training (--data.train) and eval (--data.eval) files"
            )
    folder = resolve_model(config.model, config.tokenizer, config.train.seed)  # a preset: built once
    from_scratch = config.model in PRESET_MODELS
    task_class = tasks.task_class(config.task)
    kind = model_kind(folder)
    tokenizer, model_config = load_tokenizer_for(folder), load_config(folder)
    inputs = describe_inputs(
        [Path(p) for p in (config.data.train, config.data.eval) if p]
        + ([Path(config.tokenizer) / "tokenizer.json"] if from_scratch else [])
        + (variant.more_inputs if variant else [])
    )
    run_fingerprint = fingerprint(run_config, inputs, RUN_ONLY_FIELDS)

    # 1. data, and the settings derived from it
    task = task_class.from_training_files(
        tokenizer, model_config, config.data, config.train.seed, config.train.batch_size, config.train.seq_len
    )
    task.use_length_grouping(config.data.group_by_length)
    if not task.train or not task.eval:
        raise InputError(
            f"{config.data.train}: too few examples to train and evaluate; give an eval file or more rows"
        )
    if config.eval_metric and config.eval_metric not in task.metrics:
        raise ConfigError(f"eval_metric: {config.task} reports {', '.join(task.metrics)}; pick one of them")
    config = resolve_defaults(
        config, task, model_config, task.max_length, rank_info.world_size, from_scratch=from_scratch
    )
    checkpoints = open_output(out, stage, run_fingerprint, config.resume, config.force, rank_info)
    if checkpoints is None:
        return read_manifest(out)["metrics"]

    # 2. the model and the method
    configure_threads(config.train.threads, rank_info.world_size)
    keep_freed_memory()
    torch.manual_seed(config.train.seed)
    if task.model_kind == "decoder" and kind != "decoder":
        raise InputError(f"{folder} is a {kind} model; {config.task} tunes decoders (*ForCausalLM folders)")
    if (task.model_kind == "seq2seq") != (kind == "seq2seq"):
        raise InputError(
            f"{folder} is a {kind} model; seq2seq trains encoder-decoders (a seq2seq-* preset, *MTModel or "
            "*ForConditionalGeneration folders) and the other tasks do not"
        )
    model = load_model(folder, task.model_kind, new_head=task.new_head())
    if config.method == "top_layers":
        freeze_all_but_top_layers(model, config.top_layers)
    elif config.method == "lora":
        lora = config.lora
        model = apply_lora(model, task, lora.rank, lora.alpha, lora.dropout, lora.target_modules)
    trainable, total = trainable_share(model)
    dist.print0(
        f"{config.task} / {config.method}: {total / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trainable "
        f"({100 * trainable / total:.2f}%); {len(task.train):,} training {task.example_unit} and "
        f"{len(task.eval):,} evaluation examples"
    )
    if task.uses_class_weights and task.wants_class_weights(config.data.class_weights):
        task.use_class_weights()
        dist.print0(
            "class weights: "
            + ", ".join(f"{n} {w:.2f}" for n, w in zip(task.names, task.class_weights.tolist()))
        )
    model.to(rank_info.device)
    compile_module, compile_note = compile_decision(
        config.train.compile, rank_info.device, config.train.max_steps, static_shapes=False
    )
    if compile_module:  # asked for with --train.compile true; auto never compiles padded batches
        dist.print0(f"training step: {compile_note}")
    loop_task = variant.loop_task(task, model, rank_info.device) if variant else task
    train_module = wrap_for_training(loop_task.wrap(model), config.train.strategy, rank_info, compile_module)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.train.max_steps, config.optim)
    metric = config.eval_metric or task.default_metric
    best = BestModel(out / BEST, metric, metric in task.lower_is_better, config.patience, model, rank_info)
    start_step = 0
    if checkpoints:
        state = load_checkpoint(checkpoints[-1], train_module, optimizer, scheduler, rank_info)
        start_step = state["step"]
        best.load_state_dict(state["extra"].get("best", {}))
        dist.print0(f"resuming from {checkpoints[-1]} (step {start_step})")
    if rank_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    # 3. train
    adversarial = config.adversarial
    backward = plain_backward
    if adversarial.method != "none":
        backward = Adversary(
            model, adversarial.method, adversarial.epsilon, adversarial.step_size, adversarial.steps
        )
    result = train(
        task=loop_task,
        model=model,
        train_module=train_module,
        optimizer=optimizer,
        scheduler=scheduler,
        config=config.train,
        grad_clip=config.optim.grad_clip,
        out=out,
        run_config=run_config,
        rank_info=rank_info,
        progress=config.progress,
        start=Start(start_step),
        hooks=LoopHooks(backward, on_evaluate=best, extra_state=lambda: {"best": best.state_dict()}),
    )
    if result.stopped_by in ("SIGINT", "SIGTERM"):
        return {"step": result.step, "stopped_by": result.stopped_by}

    # 4. the best weights, evaluated and saved (collective: every rank gathers and evaluates, rank 0 writes)
    best.restore(model)
    weights = full_state_dict(model)  # FSDP: the shards gathered onto rank 0
    model.eval()
    with gathered(train_module):
        report = task.final_report(model, rank_info.device, config.train.sample_tokens)
    metrics: dict[str, Any] = {
        "step": result.step,
        "best_step": best.best_step,
        f"best_{metric}": best.best_value,
        "train_loss": result.train_loss,
        "train_samples_per_s": result.samples_seen / max(result.train_seconds, 1e-9),
        "stopped_by": result.stopped_by,
        "trainable_parameters": trainable,
        "parameters": total,
        **{f"eval_{k}": v for k, v in report.items() if isinstance(v, int | float)},
    }
    if rank_info.is_main:
        save_report(out, task, report, title=f"{Path(config.model).name} / {config.method}")
        save_model(model, tokenizer, out, config.merge, weights)
        shutil.rmtree(out / BEST, ignore_errors=True)
        if variant and variant.write_more:
            metrics.update(variant.write_more(out, model, task))
        Manifest(stage, run_config, inputs, run_fingerprint, started_at=started, metrics=metrics).write(out)
        dist.print0(f"model saved to {out} (best {metric} {best.best_value:.4f} at step {best.best_step})")
    dist.barrier()
    return metrics


def default_learning_rate(method: str, width: int) -> float:
    """Peak learning rate by method and model width: small models and few trainable weights take more.

    Full fine-tuning: 1e-4 up to width 512 (MiniLM), 5e-5 up to 1024 (BERT-base, SmolLM2), 2e-5 beyond
    (Devlin et al.'s range); LoRA 10x that, at most 1e-3 (Hu et al. 2021); top layers 5x.
    """
    full = 1e-4 if width <= 512 else 5e-5 if width <= 1024 else 2e-5
    return {"full": full, "lora": min(1e-3, 10 * full), "top_layers": 5 * full}[method]


def resolve_defaults(
    config: FinetuneConfig,
    task: SupervisedTask,
    model_config,
    max_length: int,
    world_size: int,
    from_scratch: bool = False,
) -> FinetuneConfig:
    """Fill every automatic (0) setting from the data, method and model, and say what was chosen."""
    steps_per_epoch = task.steps_per_epoch(config.train.grad_accum, world_size)
    target_steps = task.target_steps or max(TARGET_STEPS, STEPS_PER_LABEL * len(task.names))
    epochs = config.epochs or float(min(10, max(1, round(target_steps / steps_per_epoch))))
    if from_scratch and not config.epochs:
        epochs = FROM_SCRATCH_EPOCHS
    max_steps = config.train.max_steps or max(1, math.ceil(epochs * steps_per_epoch))
    width = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", 768)
    lr = config.optim.lr or (
        FROM_SCRATCH_LR if from_scratch else task.lr_scale * default_learning_rate(config.method, width)
    )
    warmup = config.optim.warmup_steps if config.optim.warmup_steps >= 0 else math.ceil(0.06 * max_steps)
    eval_every = config.train.eval_every or steps_per_epoch
    train = dataclasses.replace(
        config.train,
        seq_len=max_length,
        max_steps=max_steps,
        eval_every=eval_every,
        checkpoint_every=config.train.checkpoint_every or eval_every,
    )
    optim = dataclasses.replace(config.optim, lr=lr, warmup_steps=warmup)
    # What will happen, not what was asked: --train.max_steps may cap the epochs, and an evaluation
    # interval beyond the last step means one evaluation, at the end.
    epochs = max_steps / steps_per_epoch
    evaluations = max_steps // eval_every
    when = (
        "one evaluation, at the end"
        if evaluations == 0 or (evaluations == 1 and max_steps == eval_every)
        else f"evaluation every {eval_every} steps and at the end"
        if max_steps % eval_every
        else f"evaluation every {eval_every} steps"
    )
    dist.print0(
        f"settings: {max_steps} steps of {config.train.batch_size * config.train.grad_accum} examples "
        f"= {epochs:.3g} epochs of {len(task.train):,} {task.example_unit}, lr {lr:.1e} ({config.method}, "
        f"width {width}), warmup {warmup} steps, max length {max_length}, {when}"
    )
    return dataclasses.replace(
        config, epochs=config.epochs or float(round(epochs, 3)), train=train, optim=optim
    )


class BestModel:
    """The loop's `on_evaluate`: keeps the trainable weights of the best evaluation in `folder` and says
    when `patience` evaluations in a row brought no improvement.

    Collective, like the loop's evaluation: every rank calls it and `restore` (FSDP gathers and scatters
    the weights' shards); rank 0 writes the file, every rank reads it back.
    """

    def __init__(
        self, folder: Path, metric: str, lower_is_better: bool, patience: int, model, rank_info
    ) -> None:
        self.folder, self.metric, self.lower_is_better, self.patience = (
            folder,
            metric,
            lower_is_better,
            patience,
        )
        self.model, self.rank_info = model, rank_info
        self.best_value: float | None = None
        self.best_step = 0
        self.bad_evaluations = 0

    def __call__(self, step: int, metrics: dict[str, float]) -> bool:
        if self.metric not in metrics:
            raise ConfigError(
                f"eval_metric: '{self.metric}' is not reported; choose one of {', '.join(metrics)}"
            )
        value = metrics[self.metric]
        better = self.best_value is None or (
            value < self.best_value if self.lower_is_better else value > self.best_value
        )
        if better:
            self.best_value, self.best_step, self.bad_evaluations = value, step, 0
            state = full_state_dict(self.model, trainable_only=True)
            if self.rank_info.is_main:
                with staging_folder(self.folder) as stage:
                    torch.save(state, stage / "state.pt")
            dist.barrier()  # the file is complete before any rank may read it back
        else:
            self.bad_evaluations += 1
        return bool(self.patience) and self.bad_evaluations >= self.patience

    def restore(self, model) -> None:
        """Put the best evaluation's weights back into `model` (none saved: it keeps its own)."""
        if (self.folder / "state.pt").is_file():
            state = torch.load(self.folder / "state.pt", map_location="cpu")
            # It holds the trainable weights only (strict=False below); they must be exactly the model's.
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            if set(state) != trainable:
                raise RuntimeError(
                    f"the best model's weights do not match the model: {len(set(state) - trainable)} unexpected, "
                    f"{len(trainable - set(state))} missing (e.g. {sorted(set(state) ^ trainable)[:3]})"
                )
            load_full_state_dict(model, state, strict=False)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_value": self.best_value,
            "best_step": self.best_step,
            "bad_evaluations": self.bad_evaluations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_value = state.get("best_value")
        self.best_step = state.get("best_step", 0)
        self.bad_evaluations = state.get("bad_evaluations", 0)


def save_model(
    model, tokenizer, out: Path, merge: bool, weights: dict[str, torch.Tensor] | None = None
) -> None:
    """The tuned model as an HF folder in `out` (written to a temp folder, then moved into place).

    `weights`: the model's whole state (`parallel.full_state_dict`), which FSDP's model holds only as shards.

    LoRA: the adapter (adapter_config.json, adapter_model.safetensors, with the new head) plus the task
    model's config.json; with `merge`, a plain HF folder and the adapter under adapter/.
    """
    with files_into(out) as temporary:
        if is_peft(model):
            base_config = model.get_base_model().config
            base_config.architectures = [type(model.get_base_model()).__name__]  # the task class, for loaders
            if merge:
                model.save_pretrained(temporary / "adapter")
                merge_lora(model).save_pretrained(temporary, safe_serialization=True)
            else:
                model.save_pretrained(temporary, state_dict=weights)
                base_config.save_pretrained(temporary)
        else:
            model.save_pretrained(temporary, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(temporary)
