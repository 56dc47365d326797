"""`llmk evaluate`: a model folder on a data file, clean and (optionally) under a seeded attack.

The task comes from the model folder's kind and the file (`llmkernel.tasks.task_for_model`) unless
`--task` names it; the task reads the file, predicts and reports:

* classify: per-class precision/recall/F1 and support, accuracy, macro/micro/weighted F1, the confusion
  matrix (printed, eval.json, confusion_matrix.png);
* ner: entity-level precision/recall/F1 per type (seqeval's rules) and token accuracy;
* relation: SemEval-2010 Task 8's official score (macro-F1 over the relation types, direction taken into
  account, Other excluded), the per-relation table, accuracy and the confusion matrix;
* lm: perplexity and bits per byte of a text file (bytes of the file's UTF-8 text, so any tokenizer compares);
* sft: loss and perplexity on the assistant turns of a chat file, and sample replies.
A retrieval set (a BEIR folder, or an index folder as MODEL) goes to `llmkernel.retrieval.evaluate`
instead (`stages.evaluate` tells them apart): nDCG@10, recall@100 and MRR@10 of dense, BM25 and hybrid.

`--attack typo|swap|delete` edits characters of a share of the words (the same seed, the same edits);
`--attack hotflip` swaps a share of the tokens for those that raise the loss most to first order, from the
model's own embeddings. Like every stage, the output folder is staged and gets a run.json; an unchanged
re-run says "up to date" (`--force` runs it again).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmkernel import tasks
from llmkernel.config import to_dict
from llmkernel.errors import InputError
from llmkernel.eval.attacks import hotflip, perturb_words
from llmkernel.eval.config import RUN_ONLY_FIELDS, EvaluateConfig
from llmkernel.models.loading import load_model, load_tokenizer_for, model_kind, resolve_model
from llmkernel.runs import (
    Manifest,
    describe_inputs,
    fingerprint,
    is_up_to_date,
    staging_folder,
)
from llmkernel.runtime import configure_threads, default_device
from llmkernel.tasks.base import IGNORE, SupervisedTask
from llmkernel.tasks.report import save_report

STAGE = "evaluate"


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Run `llmk evaluate`; returns what eval.json holds."""
    started = time.time()
    if not Path(config.data).is_file():  # inputs first: a missing file before anything about the model
        raise InputError(f"{config.data}: no such file; pass the evaluation file with --data")
    folder = resolve_model(config.model)
    kind = model_kind(folder)
    task_class = (
        tasks.task_for_model(kind, config.data) if config.task == "auto" else tasks.task_class(config.task)
    )
    if config.attack != "none" and not task_class.attackable:
        raise InputError(
            f"--attack applies to classify and ner models; {folder} is evaluated as {task_class.name}"
        )
    out = Path(config.out)
    inputs = describe_inputs([Path(config.data), *model_files(folder)])
    run_fingerprint = fingerprint(to_dict(config), inputs, RUN_ONLY_FIELDS)
    if not config.force and is_up_to_date(out, STAGE, run_fingerprint):
        print(f"{out} is up to date (same model, data and settings); --force evaluates again")
        return json.loads((out / "eval.json").read_text(encoding="utf-8"))

    configure_threads(config.threads, 1)
    device = default_device()
    model = load_model(folder, task_class.model_kind).to(device).eval()
    tokenizer = load_tokenizer_for(folder)
    limit = getattr(model.config, "max_position_embeddings", None) or 1024
    max_length = config.max_length or min(limit, 1024 if task_class.model_kind == "decoder" else 512)
    columns = {
        "text_column": config.text_column,
        "pair_column": config.pair_column,
        "label_column": config.label_column,
        # task options beside the columns: seq2seq's source/target columns and beams, sft's prompt template
        "source_column": config.source_column,
        "target_column": config.target_column,
        "num_beams": config.num_beams,
        "prompt_template": config.prompt_template,
    }
    task = task_class.for_evaluation(
        config.data, model, tokenizer, max_length, config.batch_size, columns, config.limit
    )
    task.progress = config.progress
    report = task.final_report(model, device, config.sample_tokens)
    attacked, attack = None, None
    if config.attack != "none":
        attack = {"kind": config.attack, "rate": config.attack_rate, "seed": config.seed}
        if config.attack == "hotflip":
            perturbed = hotflip_examples(task, model, task.eval, config.attack_rate)
        else:  # each example its own seed: the edits do not depend on the order of the file
            kind_, rate, seed = config.attack, config.attack_rate, config.seed
            perturbed = task.perturbed(
                lambda words, i: perturb_words(words, kind_, rate, seed * 1_000_003 + i)
            )
        attacked = task.report(model, device, perturbed)
    title = f"{Path(folder).name} on {Path(config.data).name}"
    with staging_folder(out) as stage:
        document = save_report(
            stage,
            task,
            report,
            title,
            attacked,
            attack,
            extra={"model": str(folder), "data": str(config.data)},
        )
        metrics = {k: v for k, v in report.items() if isinstance(v, int | float)}
        if attacked is not None:
            metrics.update({f"attacked_{k}": v for k, v in attacked.items() if isinstance(v, int | float)})
        Manifest(STAGE, to_dict(config), inputs, run_fingerprint, started_at=started, metrics=metrics).write(
            stage
        )
    print(f"eval.json and run.json written to {out}")
    return document


def model_files(folder: Path) -> list[Path]:
    """The files of a model folder that determine its outputs (weights, config, tokenizer, adapter)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name != "run.json")


def hotflip_examples(task: SupervisedTask, model, examples: list[dict[str, Any]], rate: float) -> list[dict]:
    """The examples with a `rate` share of their (non-special) tokens flipped by HotFlip against their labels."""
    embedding = model.get_input_embeddings()
    special = sorted(set(task.tokenizer.all_special_ids))
    forbidden = special + list(range(len(task.tokenizer), embedding.weight.shape[0]))
    flipped = [dict(e) for e in examples]
    for indices, batch in task.eval_batches(examples):
        inputs = task.model_inputs(batch)
        protected = torch.isin(batch["input_ids"], torch.tensor(special)) | (batch["attention_mask"] == 0)

        def loss_of_embeddings(embeds: torch.Tensor, inputs=inputs, labels=batch["labels"]) -> torch.Tensor:
            rest = {k: v for k, v in inputs.items() if k != "input_ids"}
            logits = model(inputs_embeds=embeds, **rest).logits.float()
            return F.cross_entropy(
                logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=IGNORE, reduction="sum"
            )

        new_ids = hotflip(embedding, batch["input_ids"], loss_of_embeddings, rate, protected, forbidden)
        for row, index in enumerate(indices):
            length = len(examples[index]["input_ids"])
            flipped[index]["input_ids"] = new_ids[row, :length].tolist()
    return flipped
