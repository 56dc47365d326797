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
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkernel import dist
from llmkernel.config import to_dict
from llmkernel.errors import ConfigError, InputError, first_line
from llmkernel.io.chat import read_chat
from llmkernel.io.conll import read_conll, tag_names
from llmkernel.io.tables import ClassificationData, label_names, read_classification
from llmkernel.models.loading import quiet_transformers, resolve_model
from llmkernel.runs import (
    Manifest,
    check_writable_parent,
    describe_inputs,
    fingerprint,
    read_manifest,
    staging_folder,
)
from llmkernel.runtime import configure_threads, keep_freed_memory
from llmkernel.tasks.base import SupervisedTask
from llmkernel.tasks.classify import Classify
from llmkernel.tasks.ner import TokenClassify
from llmkernel.tasks.report import save_report
from llmkernel.tasks.sft import ChatSFT
from llmkernel.train.adversarial import Adversary
from llmkernel.train.checkpoint import load_checkpoint, open_output
from llmkernel.train.compile import compile_decision
from llmkernel.train.config import RUN_ONLY_FIELDS, FinetuneConfig
from llmkernel.train.loop import plain_backward, train
from llmkernel.train.methods import (
    apply_lora,
    freeze_all_but_top_layers,
    is_peft,
    merge_lora,
    trainable_share,
)
from llmkernel.train.optim import build_optimizer, build_scheduler
from llmkernel.train.parallel import wrap_for_training

STAGE = "finetune"
TARGET_STEPS = 800  # default epochs aim at about this many optimizer steps (at least 1, at most 10 epochs)
BEST = "best"


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Run `llmk finetune`; returns the final metrics (also in run.json)."""
    rank_info = dist.init()
    try:
        return _finetune(config, rank_info)
    finally:
        dist.cleanup()


def _finetune(config: FinetuneConfig, rank_info: dist.DistInfo) -> dict[str, Any]:
    started = time.time()
    out = Path(config.out)
    check_writable_parent(out)
    folder = resolve_model(config.model)
    tokenizer, model_config = load_tokenizer_and_config(folder)
    inputs = describe_inputs([Path(p) for p in (config.data.train, config.data.eval) if p])
    user_config = to_dict(config)
    run_fingerprint = fingerprint(user_config, inputs, RUN_ONLY_FIELDS)

    # 1. data, and the settings derived from it
    task = build_task(config, tokenizer, model_config)
    max_length = task.max_length
    if config.eval_metric and config.eval_metric not in task.metrics:
        raise ConfigError(f"eval_metric: {config.task} reports {', '.join(task.metrics)}; pick one of them")
    config = resolve_defaults(config, task, model_config, max_length, rank_info.world_size)
    checkpoints = open_output(out, STAGE, run_fingerprint, config.resume, config.force, rank_info)
    if checkpoints is None:
        return read_manifest(out)["metrics"]

    # 2. the model and the method
    configure_threads(config.train.threads, rank_info.world_size)
    keep_freed_memory()
    torch.manual_seed(config.train.seed)
    model = load_task_model(folder, config.task, task, tokenizer)
    if config.method == "top_layers":
        freeze_all_but_top_layers(model, config.top_layers)
    elif config.method == "lora":
        model = apply_lora(
            model,
            config.task,
            config.lora.rank,
            config.lora.alpha,
            config.lora.dropout,
            config.lora.target_modules,
        )
    trainable, total = trainable_share(model)
    unit = "rows (packed conversations)" if config.task == "sft" and config.data.packing else "examples"
    dist.print0(
        f"{config.task} / {config.method}: {total / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trainable "
        f"({100 * trainable / total:.2f}%); {len(task.train):,} training {unit} and {len(task.eval):,} evaluation examples"
    )
    if config.task != "sft" and task.wants_class_weights(config.data.class_weights):
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
    train_module = wrap_for_training(
        task.wrap(model) if hasattr(task, "wrap") else model, config.train.strategy, rank_info, compile_module
    )
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
        task=task,
        model=model,
        train_module=train_module,
        optimizer=optimizer,
        scheduler=scheduler,
        config=config.train,
        out=out,
        progress=config.progress,
        run_config=to_dict(config),
        rank_info=rank_info,
        start_step=start_step,
        tokens_seen=0,
        flops_per_token=0,
        peak_flops=0.0,
        grad_clip=config.optim.grad_clip,
        sample=getattr(task, "sample", None),
        backward=backward,
        on_evaluate=best,
        extra_state=lambda: {"best": best.state_dict()},
    )
    if result.stopped_by in ("SIGINT", "SIGTERM"):
        return {"step": result.step, "stopped_by": result.stopped_by}

    # 4. the best weights, evaluated and saved
    metrics: dict[str, Any] = {}
    if rank_info.is_main:
        best.restore(model)
        report = task.report(model, rank_info.device)
        if config.task == "sft":
            report["samples"] = sft_samples(task, model, rank_info.device, config.train.sample_tokens)
        save_report(out, config.task, report, title=f"{Path(config.model).name} / {config.method}")
        save_model(model, tokenizer, out, config.merge)
        metrics = {
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
        shutil.rmtree(out / BEST, ignore_errors=True)
        Manifest(STAGE, to_dict(config), inputs, run_fingerprint, started_at=started, metrics=metrics).write(
            out
        )
        dist.print0(f"model saved to {out} (best {metric} {best.best_value:.4f} at step {best.best_step})")
    dist.barrier()
    return metrics


def load_tokenizer_and_config(folder: Path):
    """The model folder's tokenizer and config, or one line saying the folder is not a usable model."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        model_config = AutoConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(
            f"{folder} is not a usable model folder ({first}); pass an HF model folder"
        ) from None
    if tokenizer.pad_token_id is None:  # decoders often have none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model_config


def build_task(config: FinetuneConfig, tokenizer, model_config) -> SupervisedTask:
    """The task with its training and evaluation examples encoded (a held-out share when no eval file).

    Each file is read once; the max length (unless set) comes from the training examples just read.
    """
    data, seed, batch = config.data, config.train.seed, config.train.batch_size

    def max_length(lengths: Callable[[int], list[int]]) -> int:
        return config.train.seq_len or default_max_length(lengths, config.task, model_config, data.train)

    if config.task == "classify":
        train = read_classification(
            data.train, data.text_column, data.pair_column, data.label_column, limit=data.limit
        )
        columns = (train.text_column, train.pair_column, train.label_column)
        evaluation = read_classification(data.eval, *columns) if data.eval else None
        train, evaluation = _split(train, evaluation, data.eval_fraction, seed)
        labels = label_names(train.labels, evaluation.labels, data.eval or data.train)
        if len(labels) < 2:
            raise InputError(
                f"{data.train}: only one label ({labels[0]!r}); classification needs two or more"
            )

        def lengths(count: int) -> list[int]:
            pairs = train.pairs[:count] if train.pairs else None
            return [len(ids) for ids in tokenizer(train.texts[:count], pairs)["input_ids"]]

        task = Classify(tokenizer, labels, max_length(lengths), batch, seed)
        task.set_train(task.encode(train))
        task.eval = task.encode(evaluation)
    elif config.task == "ner":
        train = read_conll(data.train)[: data.limit or None]
        evaluation = read_conll(data.eval) if data.eval else None
        train, evaluation = _split(train, evaluation, data.eval_fraction, seed)
        tags = tag_names(train)
        unknown = sorted({t for s in evaluation for t in s.tags} - set(tags))
        if unknown:
            raise InputError(
                f"tags in {data.eval or data.train} missing from the training data: {', '.join(unknown[:5])}; "
                "every evaluation tag must occur in training"
            )

        def lengths(count: int) -> list[int]:
            encoded = tokenizer([s.tokens for s in train[:count]], is_split_into_words=True)
            return [len(ids) for ids in encoded["input_ids"]]

        task = TokenClassify(tokenizer, tags, max_length(lengths), batch, seed)
        task.set_train(task.encode(train))
        task.eval, task.eval_sentences = task.encode(evaluation), evaluation
    else:
        train = read_chat(data.train)[: data.limit or None]
        evaluation = read_chat(data.eval) if data.eval else None
        train, evaluation = _split(train, evaluation, data.eval_fraction, seed)
        task = ChatSFT(tokenizer, 0, batch, seed, packing=data.packing)
        task.max_length = max_length(
            lambda count: [len(task.encode_conversation(c)["input_ids"]) for c in train[:count]]
        )
        task.set_data(train, evaluation)
    if not task.train or not task.eval:
        raise InputError(
            f"{data.train}: too few examples to train and evaluate; give an eval file or more rows"
        )
    return task


def _split(train, evaluation, fraction: float, seed: int):
    """(train, evaluation): the given eval set, or a seeded `fraction` of train held out."""
    if evaluation is not None:
        return train, evaluation
    if isinstance(train, ClassificationData):
        order = np.random.default_rng(seed).permutation(len(train.texts))
        cut = max(1, int(len(order) * fraction))

        def take(indices):
            pick = lambda values: None if values is None else [values[i] for i in indices]  # noqa: E731
            return dataclasses.replace(
                train, texts=pick(train.texts), pairs=pick(train.pairs), labels=pick(train.labels)
            )

        return take(order[cut:]), take(order[:cut])
    order = np.random.default_rng(seed).permutation(len(train))
    cut = max(1, int(len(order) * fraction))
    return [train[i] for i in order[cut:]], [train[i] for i in order[:cut]]


def default_max_length(
    lengths: Callable[[int], list[int]], task: str, model_config, path: str, sample: int = 20000
) -> int:
    """Long enough for 99.5% of the training examples (a multiple of 8), within the model's context.

    `lengths(n)` gives the token lengths of the first n training examples (a sample: tokenizing is the
    cost). Dynamic padding makes a generous bound cheap; only the rare outliers beyond it are truncated.
    """
    limit = getattr(model_config, "max_position_embeddings", None) or 2048
    if task == "sft":
        limit, sample = min(limit, 2048), 2000  # rendering chat templates is slower
    counted = lengths(sample)
    if not counted:
        raise InputError(f"{path}: no examples")
    return int(min(limit, max(8, math.ceil(np.percentile(counted, 99.5) / 8) * 8)))


def default_learning_rate(method: str, width: int) -> float:
    """Peak learning rate by method and model width: small models and few trainable weights take more.

    Full fine-tuning: 1e-4 up to width 512 (MiniLM), 5e-5 up to 1024 (BERT-base, SmolLM2), 2e-5 beyond
    (Devlin et al.'s range); LoRA 10x that, at most 1e-3 (Hu et al. 2021); top layers 5x.
    """
    full = 1e-4 if width <= 512 else 5e-5 if width <= 1024 else 2e-5
    return {"full": full, "lora": min(1e-3, 10 * full), "top_layers": 5 * full}[method]


def resolve_defaults(
    config: FinetuneConfig, task: SupervisedTask, model_config, max_length: int, world_size: int
) -> FinetuneConfig:
    """Fill every automatic (0) setting from the data, method and model, and say what was chosen."""
    steps_per_epoch = task.steps_per_epoch(config.train.grad_accum, world_size)
    epochs = config.epochs or float(min(10, max(1, round(TARGET_STEPS / steps_per_epoch))))
    max_steps = config.train.max_steps or max(1, math.ceil(epochs * steps_per_epoch))
    width = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", 768)
    lr = config.optim.lr or default_learning_rate(config.method, width)
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
    dist.print0(
        f"settings: {epochs:g} epochs = {max_steps} steps of {config.train.batch_size * config.train.grad_accum} "
        f"({len(task.train):,} examples), lr {lr:.1e} ({config.method}, width {width}), warmup {warmup} steps, "
        f"max length {max_length}, evaluation every {eval_every} steps"
    )
    return dataclasses.replace(config, epochs=epochs, train=train, optim=optim)


def load_task_model(folder: Path, task_name: str, task: SupervisedTask, tokenizer):
    """The model with the task's head: sequence or token classification (a new head for the labels), or
    a causal LM for sft."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if task_name == "sft":
        loader = AutoModelForCausalLM
    else:
        names = task.labels if task_name == "classify" else task.tags
        loader = (
            AutoModelForSequenceClassification if task_name == "classify" else AutoModelForTokenClassification
        )
        kwargs.update(
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
            ignore_mismatched_sizes=True,  # a folder that already has a head for other labels gets a new one
            pad_token_id=tokenizer.pad_token_id,
        )
    quiet_transformers()  # "newly initialized: classifier" is expected; we print our own line
    try:
        model = loader.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"{folder}: cannot load as a model for {task_name} ({first_line(error)})") from None
    return model


class BestModel:
    """The loop's `on_evaluate`: keeps the trainable weights of the best evaluation in `folder` and says
    when `patience` evaluations in a row brought no improvement."""

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
            if self.rank_info.is_main:
                state = {
                    n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad
                }
                with staging_folder(self.folder) as stage:
                    torch.save(state, stage / "state.pt")
        else:
            self.bad_evaluations += 1
        return bool(self.patience) and self.bad_evaluations >= self.patience

    def restore(self, model) -> None:
        if (self.folder / "state.pt").is_file():
            model.load_state_dict(torch.load(self.folder / "state.pt", map_location="cpu"), strict=False)

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


def sft_samples(
    task: ChatSFT, model, device: torch.device, max_new_tokens: int, count: int = 3
) -> list[dict]:
    """Greedy replies to the first evaluation prompts, next to the reference replies."""
    samples = []
    for messages in task.eval_conversations[:count]:
        reference = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
        samples.append(
            {
                "prompt": messages[-2]["content"] if len(messages) > 1 else "",
                "reference": reference,
                "reply": task.answer(model, device, messages, max_new_tokens),
            }
        )
    return samples


def save_model(model, tokenizer, out: Path, merge: bool) -> None:
    """The tuned model as an HF folder in `out` (written to a temp folder, then moved into place).

    LoRA: the adapter (adapter_config.json, adapter_model.safetensors, with the new head) plus the task
    model's config.json; with `merge`, a plain HF folder and the adapter under adapter/.
    """
    temporary = out / f".model-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    if is_peft(model):
        base_config = model.get_base_model().config
        base_config.architectures = [type(model.get_base_model()).__name__]  # the task class, for loaders
        if merge:
            model.save_pretrained(temporary / "adapter")
            merge_lora(model).save_pretrained(temporary, safe_serialization=True)
        else:
            model.save_pretrained(temporary)
            base_config.save_pretrained(temporary)
    else:
        model.save_pretrained(temporary, safe_serialization=True)
    tokenizer.save_pretrained(temporary)
    for path in temporary.iterdir():
        target = out / path.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(path, target)
    temporary.rmdir()
