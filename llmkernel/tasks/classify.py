"""`classify`: text (or text-pair) classification, cross-entropy over the labels, optionally class-weighted."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmkernel.io.tables import ClassificationData
from llmkernel.tasks.base import SupervisedTask
from llmkernel.tasks.metrics import classification_report


class Classify(SupervisedTask):
    """Text (or text-pair) classification: cross-entropy over the labels, optionally class-weighted."""

    name = "classify"
    default_metric = "accuracy"
    metrics = ("accuracy", "macro_f1", "loss")

    def __init__(self, tokenizer, labels: list[str], max_length: int, batch_size: int, seed: int = 0) -> None:
        super().__init__(tokenizer, max_length, batch_size, seed)
        self.labels = labels
        self.label_ids = {name: i for i, name in enumerate(labels)}

    @property
    def names(self) -> list[str]:
        return self.labels

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

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["labels"].numel()

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
