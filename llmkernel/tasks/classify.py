"""`classify`: text (or text-pair) classification, cross-entropy over the labels, optionally class-weighted."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmkernel.errors import InputError
from llmkernel.io.tables import ClassificationData, label_names, read_classification
from llmkernel.tasks import report as reports
from llmkernel.tasks.base import SupervisedTask, default_max_length, split_held_out
from llmkernel.tasks.metrics import classification_report


def _take(data: ClassificationData, indices: np.ndarray) -> ClassificationData:
    pick = lambda values: None if values is None else [values[i] for i in indices]  # noqa: E731
    return dataclasses.replace(data, texts=pick(data.texts), pairs=pick(data.pairs), labels=pick(data.labels))


def _named(data: ClassificationData, mapping: dict[str, str]) -> ClassificationData:
    return dataclasses.replace(data, labels=[mapping[label] for label in data.labels])


def label_mapping(values: Sequence[str], names: Sequence[str], flag: str) -> dict[str, str]:
    """The raw label values (in their sorted order) to the names given, one name per value."""
    names = [part.strip() for name in names for part in str(name).split(",") if part.strip()]
    if len(names) != len(values):
        raise InputError(
            f"{flag}: {len(names)} names for {len(values)} labels ({', '.join(map(repr, values[:10]))}); "
            "give one name per label, in this order"
        )
    return dict(zip(values, names))


class Classify(SupervisedTask):
    """Text (or text-pair) classification: cross-entropy over the labels, optionally class-weighted."""

    name = "classify"
    model_kind = "classifier"
    peft_task_type = "SEQ_CLS"
    default_metric = "accuracy"
    metrics = ("accuracy", "macro_f1", "loss")
    headline = ("accuracy", "macro_f1", "weighted_f1")

    def __init__(self, tokenizer, labels: list[str], max_length: int, batch_size: int, seed: int = 0) -> None:
        super().__init__(tokenizer, max_length, batch_size, seed)
        self.labels = labels
        self.label_ids = {name: i for i, name in enumerate(labels)}
        self.eval_data: ClassificationData | None = None  # the evaluation texts, for text attacks

    @property
    def names(self) -> list[str]:
        return self.labels

    @classmethod
    def from_training_files(
        cls, tokenizer, model_config, data: Any, seed: int, batch_size: int, max_length: int
    ):
        """The task with `data.train` (and `data.eval`, or a held-out share) read and encoded.

        `data` is the finetune data settings (FinetuneDataConfig): columns, limit, eval_fraction and the
        optional `label_names` that name the sorted label values (e.g. 0, 1 -> negative, positive).
        """
        train = read_classification(
            data.train, data.text_column, data.pair_column, data.label_column, limit=data.limit
        )
        columns = (train.text_column, train.pair_column, train.label_column)
        evaluation = read_classification(data.eval, *columns) if data.eval else None
        if evaluation is None:
            train, evaluation = split_held_out(train, data.eval_fraction, seed, _take)
        labels = label_names(train.labels, evaluation.labels, data.eval or data.train)
        if len(labels) < 2:
            raise InputError(
                f"{data.train}: only one label ({labels[0]!r}); classification needs two or more"
            )
        if data.label_names:
            mapping = label_mapping(labels, data.label_names, "data.label_names")
            train, evaluation, labels = (
                _named(train, mapping),
                _named(evaluation, mapping),
                list(mapping.values()),
            )
        if not max_length:
            pairs = train.pairs[:20000] if train.pairs else None
            counted = [len(ids) for ids in tokenizer(train.texts[:20000], pairs)["input_ids"]]
            max_length = default_max_length(counted, model_config, data.train)
        task = cls(tokenizer, labels, max_length, batch_size, seed)
        task.set_train(task.encode(train))
        task.eval = task.encode(evaluation)
        task.eval_data = evaluation
        return task

    @classmethod
    def for_evaluation(
        cls, path: str, model, tokenizer, max_length: int, batch_size: int, columns: dict, limit: int
    ):
        """The task with the labels the model knows and `path`'s examples as its evaluation set."""
        labels = [model.config.id2label[i] for i in range(len(model.config.id2label))]
        data = read_classification(
            path,
            columns.get("text_column"),
            columns.get("pair_column"),
            columns.get("label_column"),
            limit=limit,
        )
        unknown = sorted(set(data.labels) - set(labels))
        if unknown:
            raise InputError(
                f"labels in {path} unknown to the model: {', '.join(map(repr, unknown[:5]))}; "
                f"the model knows {', '.join(map(repr, labels[:10]))}"
            )
        task = cls(tokenizer, labels, max_length, batch_size)
        task.eval, task.eval_data = task.encode(data), data
        return task

    def perturbed(self, edit: Callable[[list[str], int], list[str]]) -> list[dict[str, Any]]:
        """The evaluation examples with `edit(words, seed)` applied to each text's words (whitespace kept);
        each example has its own seed, so the edits do not depend on the order of the file."""
        texts = []
        for index, text in enumerate(self.eval_data.texts):
            parts = re.split(r"(\s+)", text)  # separators at odd indices, words at 0, 2, 4, ...
            parts[0::2] = edit(parts[0::2], index)
            texts.append("".join(parts))
        return self.encode(dataclasses.replace(self.eval_data, texts=texts))

    def format_report(self, report: dict[str, Any]) -> str:
        return reports.format_classification_report(report)

    def write_figures(self, out: Path, report: dict[str, Any], title: str, suffix: str = "") -> None:
        reports.plot_confusion_matrix(
            report["confusion_matrix"], report["labels"], out / f"confusion_matrix{suffix}.png", title
        )

    def encode(self, data: ClassificationData) -> list[dict[str, Any]]:
        encoded = self.tokenizer(
            data.texts, data.pairs, truncation=True, max_length=self.max_length, return_attention_mask=False
        )
        keys = [k for k in ("input_ids", "token_type_ids") if k in encoded]
        labels = data.labels or [self.labels[0]] * len(data.texts)
        return [
            {**{k: encoded[k][i] for k in keys}, "labels": self.label_ids[label]}
            for i, label in enumerate(labels)
        ]

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(**self.model_inputs(batch)).logits.float()  # (batch, labels)
        return F.cross_entropy(logits, batch["labels"], weight=self.weight(logits.device), reduction="sum")

    @torch.no_grad()
    def predict(
        self, model: torch.nn.Module, examples: list[dict[str, Any]], device: torch.device
    ) -> tuple[np.ndarray, float]:
        """Predicted label ids for `examples` and the summed loss against their labels."""
        model.eval()
        predictions, total = np.zeros(len(examples), dtype=np.int64), 0.0
        for indices, batch in self.eval_batches(examples):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**self.model_inputs(batch)).logits.float()
            total += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            predictions[indices] = logits.argmax(-1).cpu().numpy()
        return predictions, total

    def report(
        self, model: torch.nn.Module, device: torch.device, examples: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        examples = self.eval if examples is None else examples
        predictions, total = self.predict(model, examples, device)
        report = classification_report([e["labels"] for e in examples], predictions.tolist(), self.labels)
        report["loss"] = total / max(1, len(examples))
        return report
