"""`llmk evaluate`: a model folder on a data file, clean and (optionally) under a seeded attack.

* classify: per-class precision/recall/F1 and support, accuracy, macro/micro/weighted F1, the confusion
  matrix (printed, eval.json, confusion_matrix.png);
* ner: entity-level precision/recall/F1 per type (seqeval's rules) and token accuracy;
* lm: perplexity and bits per byte of a text file (bytes of the file's UTF-8 text, so any tokenizer compares);
* sft: loss and perplexity on the assistant turns of a chat file, and sample replies.

`--attack typo|swap|delete` edits characters of a share of the words (the same seed, the same edits);
`--attack hotflip` swaps a share of the tokens for those that raise the loss most to first order, from the
model's own embeddings. The task comes from the model folder (its architecture) unless given.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmkernel.config import check, option
from llmkernel.errors import InputError, first_line
from llmkernel.eval.attacks import ATTACKS, hotflip, perturb_text, perturb_words
from llmkernel.io.chat import read_chat
from llmkernel.io.conll import read_conll
from llmkernel.io.tables import read_classification
from llmkernel.models.loading import quiet_transformers, resolve_model
from llmkernel.runtime import configure_threads
from llmkernel.tasks.base import IGNORE, SupervisedTask
from llmkernel.tasks.classify import Classify
from llmkernel.tasks.ner import TokenClassify
from llmkernel.tasks.report import save_report

EVAL_TASKS = ("auto", "classify", "ner", "lm", "sft")


@dataclass
class EvaluateConfig:
    """`llmk evaluate`: metrics of a model folder on a data file, clean and under attack."""

    model: str = option(
        "", "model folder (from llmk finetune / pretrain, any HF folder) or a known name", positional=True
    )
    data: str = option("", "evaluation file: table (classify), CoNLL (ner), text (lm) or jsonl chats (sft)")
    task: str = option("auto", "auto (from the model's architecture and the file), classify, ner, lm or sft")
    out: str = option("runs/evaluate", "folder for eval.json (and confusion_matrix.png)")
    text_column: str | None = option(None, "classify: column with the text (null: detected)")
    pair_column: str | None = option(None, "classify: column with the second text (null: detected)")
    label_column: str | None = option(None, "classify: column with the label (null: detected)")
    limit: int = option(0, "evaluate only the first N examples (0: all)")
    max_length: int = option(0, "longest input in tokens (0: the model's context, at most 512; lm: 1024)")
    batch_size: int = option(32, "examples per forward pass")
    attack: str = option("none", "none, typo, swap, delete or hotflip")
    attack_rate: float = option(0.1, "share of the words (typo/swap/delete) or tokens (hotflip) to perturb")
    seed: int = option(0, "seed of the attack")
    sample_tokens: int = option(48, "sft: tokens of each sample reply")
    threads: int = option(0, "CPU threads (0: all cores)")

    def __post_init__(self) -> None:
        check(bool(self.model), "model", "required: the model folder to evaluate")
        check(bool(self.data), "data", "required: the evaluation file")
        check(self.task in EVAL_TASKS, "task", f"must be one of {', '.join(EVAL_TASKS)}")
        check(self.attack in ("none", *ATTACKS), "attack", f"must be none or one of {', '.join(ATTACKS)}")
        check(0 < self.attack_rate <= 1, "attack_rate", "must be in (0, 1]")
        for name in ("limit", "max_length", "threads"):
            check(getattr(self, name) >= 0, name, "must be >= 0")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Run `llmk evaluate`; returns what eval.json holds."""
    configure_threads(config.threads, 1)
    quiet_transformers()
    folder = resolve_model(config.model)
    task_name = detect_task(folder, config)
    if config.attack != "none" and task_name not in ("classify", "ner"):
        raise InputError(f"--attack applies to classify and ner models; {folder} is evaluated as {task_name}")
    model, tokenizer = load_tuned_model(folder, task_name)
    device = torch.device("cpu")
    limit = getattr(model.config, "max_position_embeddings", None) or 1024
    max_length = config.max_length or min(limit, 1024 if task_name in ("lm", "sft") else 512)
    extra = {"model": str(folder), "data": str(config.data)}
    if task_name == "lm":
        return save_report(
            config.out, "lm", text_metrics(model, tokenizer, config.data, max_length), extra=extra
        )
    if task_name == "sft":
        from llmkernel.tasks.sft import ChatSFT
        from llmkernel.train.finetune import sft_samples

        conversations = read_chat(config.data)[: config.limit or None]
        task = ChatSFT(tokenizer, max_length, config.batch_size)
        task.eval, task.eval_conversations = task.encode(conversations, pack=False), conversations
        report = task.report(model, device)
        report["samples"] = sft_samples(task, model, device, config.sample_tokens)
        return save_report(config.out, "sft", report, extra=extra)

    task, examples, perturbed = build_eval_task(config, task_name, model, tokenizer, max_length)
    report = task.report(model, device, examples)
    attacked, attack = None, None
    if config.attack != "none":
        attack = {"kind": config.attack, "rate": config.attack_rate, "seed": config.seed}
        if config.attack == "hotflip":
            perturbed = hotflip_examples(task, model, examples, config.attack_rate)
        attacked = task.report(model, device, perturbed)
    title = f"{Path(folder).name} on {Path(config.data).name}"
    return save_report(config.out, task_name, report, title, attacked, attack, extra=extra)


def detect_task(folder: Path, config: EvaluateConfig) -> str:
    """The task from --task, else from the folder's architecture (and, for decoders, the file type)."""
    if config.task != "auto":
        return config.task
    try:
        architecture = (json.loads((folder / "config.json").read_text()).get("architectures") or [""])[0]
    except (OSError, json.JSONDecodeError):
        architecture = ""
    if architecture.endswith("ForSequenceClassification"):
        return "classify"
    if architecture.endswith("ForTokenClassification"):
        return "ner"
    if architecture.endswith("ForCausalLM"):
        return "sft" if Path(config.data).suffix in (".jsonl", ".json") else "lm"
    raise InputError(
        f"{folder}: cannot tell the task from its architecture '{architecture}'; pass --task classify|ner|lm|sft"
    )


def load_tuned_model(folder: Path, task_name: str):
    """(model in eval mode, tokenizer) for a plain HF folder or a LoRA adapter folder (merged on load)."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    loader = {
        "classify": AutoModelForSequenceClassification,
        "ner": AutoModelForTokenClassification,
    }.get(task_name, AutoModelForCausalLM)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        adapter = folder / "adapter_config.json"
        if adapter.is_file():
            from peft import PeftModel

            base_path = json.loads(adapter.read_text())["base_model_name_or_path"]
            base = loader.from_pretrained(
                base_path, config=AutoConfig.from_pretrained(folder), dtype=torch.float32
            )
            model = PeftModel.from_pretrained(base, folder).merge_and_unload()
        else:
            model = loader.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"{folder}: cannot load as a {task_name} model ({first_line(error)})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def build_eval_task(config: EvaluateConfig, task_name: str, model, tokenizer, max_length: int):
    """(task, clean examples, perturbed examples for text attacks or None) for classify or ner."""
    names = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    rate, seed, kind = config.attack_rate, config.seed, config.attack
    text_attack = kind not in ("none", "hotflip")
    if task_name == "classify":
        data = read_classification(
            config.data, config.text_column, config.pair_column, config.label_column, limit=config.limit
        )
        unknown = sorted(set(data.labels) - set(names))
        if unknown:
            raise InputError(
                f"labels in {config.data} unknown to the model: {', '.join(map(repr, unknown[:5]))}; "
                f"the model knows {', '.join(map(repr, names[:10]))}"
            )
        task = Classify(tokenizer, names, max_length, config.batch_size)
        perturbed = None
        if text_attack:  # each example its own seed: the edits do not depend on the order of the file
            texts = [perturb_text(t, kind, rate, seed * 1_000_003 + i) for i, t in enumerate(data.texts)]
            perturbed = task.encode(replace(data, texts=texts))
        return task, task.encode(data), perturbed
    sentences = read_conll(config.data)[: config.limit or None]
    unknown = sorted({t for s in sentences for t in s.tags} - set(names))
    if unknown:
        raise InputError(f"tags in {config.data} unknown to the model: {', '.join(unknown[:5])}")
    task = TokenClassify(tokenizer, names, max_length, config.batch_size)
    task.eval_sentences = sentences
    perturbed = None
    if text_attack:
        attacked = [
            replace(s, tokens=perturb_words(s.tokens, kind, rate, seed * 1_000_003 + i))
            for i, s in enumerate(sentences)
        ]
        perturbed = task.encode(attacked)
    return task, task.encode(sentences), perturbed


def hotflip_examples(task: SupervisedTask, model, examples: list[dict[str, Any]], rate: float) -> list[dict]:
    """The examples with a `rate` share of their (non-special) tokens flipped by HotFlip against their labels."""
    embedding = model.get_input_embeddings()
    special = sorted(set(task.tokenizer.all_special_ids))
    forbidden = special + list(range(len(task.tokenizer), embedding.weight.shape[0]))
    flipped = [dict(e) for e in examples]
    for indices, batch in task.eval_batches(examples):
        inputs = SupervisedTask.model_inputs(batch)
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


@torch.no_grad()
def text_metrics(model, tokenizer, path: str, max_length: int) -> dict[str, float]:
    """Perplexity and bits per byte of a text file, over non-overlapping windows of `max_length` tokens."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{path}: file not found; pass a UTF-8 text file")
    text = file.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise InputError(f"{path}: the file is empty")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    nats, predicted = 0.0, 0
    for start in range(0, max(1, len(ids) - 1), max_length):
        window = ids[start : start + max_length + 1][None]
        if window.shape[1] < 2:
            break
        logits = model(input_ids=window[:, :-1], use_cache=False).logits.float()
        nats += F.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
        predicted += window.shape[1] - 1
    loss = nats / max(1, predicted)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": nats / math.log(2) / len(text.encode("utf-8")),
        "tokens": predicted,
    }
