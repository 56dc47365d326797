"""Fine-tuning tasks for the one loop: `classify` (sequence classification) and `ner` (token classification).

A task tokenizes its labeled examples once, then gives the loop length-grouped, dynamically padded
micro-batches: a pure function of (seed, step, rank), so a resumed run sees the batches an uninterrupted
one would. The same task object predicts and reports for `llmk evaluate`. `sft` lives in `sft.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmkernel.eval.classification import classification_report
from llmkernel.eval.entities import entity_report
from llmkernel.train import dist
from llmkernel.train.labeled_data import ClassificationData, TaggedSentence

IGNORE = -100  # label of positions without a loss (padding, specials, later sub-tokens of a word)
GROUP_WINDOW = 50  # batches per length-sorting window (as the HF Trainer's LengthGroupedSampler)


class LengthGroupedBatches:
    """The batches of every epoch as example indices.

    Each epoch shuffles the examples, sorts them by length within windows of 50 batches, cuts batches and
    shuffles the batch order again: batches hold examples of similar length (little padding) while epochs
    stay random. Batch `i` overall is `epoch = i // per_epoch`, so any step's batches are known up front.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool = True):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.group_by_length = batch_size, seed, group_by_length
        self.per_epoch = math.ceil(len(self.lengths) / batch_size)
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def epoch(self, epoch: int) -> list[np.ndarray]:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng((self.seed, epoch))
        order = rng.permutation(len(self.lengths))
        if self.group_by_length:
            window = self.batch_size * GROUP_WINDOW
            chunks = [order[i : i + window] for i in range(0, len(order), window)]
            order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks])
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.group_by_length:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = (epoch, batches)
        return batches

    def batch(self, index: int) -> np.ndarray:
        epoch, position = divmod(index, self.per_epoch)
        return self.epoch(epoch)[position]


def pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """(len(rows), longest) tensor of `rows` right-padded with `value`."""
    longest = max(len(row) for row in rows)
    out = torch.full((len(rows), longest), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


class SupervisedTask:
    """What classify, ner and sft share: encoded examples, batching, padding and the loop's batch API."""

    name = "supervised"
    metrics: tuple[str, ...] = ()  # what `evaluate` reports; `eval_metric` picks one of them
    default_metric = "loss"
    lower_is_better = ("loss", "perplexity", "bits_per_byte")

    def __init__(self, tokenizer, max_length: int, batch_size: int, seed: int) -> None:
        self.tokenizer = tokenizer
        self.max_length, self.batch_size, self.seed = max_length, batch_size, seed
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.train: list[dict[str, list[int]]] = []
        self.eval: list[dict[str, list[int]]] = []
        self.batches: LengthGroupedBatches | None = None

    class_weights: torch.Tensor | None = None
    # Class weights are (n / (classes x count)) ** power (King and Zeng 2001 at power 1). Token labels are far
    # more skewed (~90% "O" in NER), so token classification softens them with a smaller power.
    class_weight_power = 1.0

    @property
    def names(self) -> list[str]:
        """The label names (classes or tags); ids index into it."""
        return []

    def label_counts(self) -> np.ndarray:
        """How often each label id occurs in the training examples (IGNORE positions left out)."""
        ids = [
            i for e in self.train for i in (e["labels"] if isinstance(e["labels"], list) else [e["labels"]])
        ]
        ids = np.asarray([i for i in ids if i != IGNORE], dtype=np.int64)
        return np.bincount(ids, minlength=len(self.names))

    def wants_class_weights(self, setting: str) -> bool:
        """ "true"/"false" as given; "auto": when the most frequent label is 3x the least frequent."""
        if setting != "auto":
            return setting == "true"
        counts = self.label_counts()
        return counts.max() >= 3 * max(1, counts.min())

    def use_class_weights(self) -> None:
        counts = self.label_counts().astype(float)
        weights = (counts.sum() / (len(counts) * np.maximum(counts, 1.0))) ** self.class_weight_power
        self.class_weights = torch.tensor(weights, dtype=torch.float32)

    def weight(self, device: torch.device) -> torch.Tensor | None:
        return None if self.class_weights is None else self.class_weights.to(device)

    def set_train(self, examples: list[dict[str, Any]]) -> None:
        self.train = examples
        self.batches = LengthGroupedBatches(
            [len(e["input_ids"]) for e in examples], self.batch_size, self.seed
        )

    def steps_per_epoch(self, grad_accum: int, world_size: int) -> int:
        return math.ceil(self.batches.per_epoch / (grad_accum * world_size))

    def collate(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad a list of encoded examples to the longest one (dynamic padding)."""
        ids = [e["input_ids"] for e in examples]
        batch = {
            "input_ids": pad(ids, self.pad_id),
            "attention_mask": pad([[1] * len(row) for row in ids], 0),
        }
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = pad([e["token_type_ids"] for e in examples], 0)
        label = examples[0]["labels"]
        if isinstance(label, list):
            batch["labels"] = pad([e["labels"] for e in examples], IGNORE)
        else:
            batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        return batch

    def micro_batches(
        self, step: int, count: int, rank: int, world_size: int
    ) -> list[dict[str, torch.Tensor]]:
        first = step * count * world_size + rank * count  # this rank's batches among the step's
        return [self.collate([self.train[i] for i in self.batches.batch(first + m)]) for m in range(count)]

    def report(self, model: torch.nn.Module, device: torch.device, examples=None) -> dict[str, Any]:
        """The full report of the task's metrics on `examples` (default: the evaluation set)."""
        raise NotImplementedError

    def evaluate(
        self, model: torch.nn.Module, device: torch.device, rank: int, world_size: int
    ) -> dict[str, float]:
        """The loop's evaluation: the task's `metrics` from `report` on the evaluation set, computed on
        rank 0 (the sets are small) and shared with every rank."""
        metrics = None
        if rank == 0:
            report = self.report(model, device)
            metrics = {k: report[k] for k in self.metrics}
        return dist.broadcast_object(metrics)

    @staticmethod
    def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def eval_batches(self, examples: list[dict[str, Any]], rank: int = 0, world_size: int = 1):
        """(indices, batch) over this rank's share of `examples`, longest first (little padding)."""
        order = np.argsort([-len(e["input_ids"]) for e in examples], kind="stable")[rank::world_size]
        for i in range(0, len(order), self.batch_size):
            indices = order[i : i + self.batch_size]
            yield indices, self.collate([examples[j] for j in indices])


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


@dataclass
class EncodedSentence:
    """A sentence's sub-word ids, the label of each (first sub-token of a word) and where each word starts."""

    input_ids: list[int]
    labels: list[int]
    word_starts: list[int]  # token index of each word's first sub-token, -1 if truncated away or empty


class TokenClassify(SupervisedTask):
    """Named-entity recognition: one tag per word, on the word's first sub-token (BERT's convention)."""

    name = "ner"
    default_metric = "f1"

    @property
    def names(self) -> list[str]:
        return self.tags

    metrics = ("f1", "precision", "recall", "token_accuracy")

    def __init__(self, tokenizer, tags: list[str], max_length: int, batch_size: int, seed: int = 0) -> None:
        super().__init__(tokenizer, max_length, batch_size, seed)
        self.tags = tags
        self.tag_ids = {name: i for i, name in enumerate(tags)}
        self.class_weight_power = 0.5
        self.eval_sentences: list[TaggedSentence] = []

    def encode(self, sentences: Sequence[TaggedSentence]) -> list[dict[str, Any]]:
        encoded = self.tokenizer(
            [s.tokens for s in sentences],
            is_split_into_words=True,
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=False,
        )
        examples = []
        for index, sentence in enumerate(sentences):
            ids = encoded["input_ids"][index]
            labels, starts = [IGNORE] * len(ids), [-1] * len(sentence.tokens)
            previous = None
            for position, word in enumerate(encoded.word_ids(index)):
                if word is not None and word != previous:
                    starts[word] = position
                    labels[position] = self.tag_ids.get(sentence.tags[word], 0)
                previous = word
            example = {"input_ids": ids, "labels": labels, "word_starts": starts}
            if "token_type_ids" in encoded:
                example["token_type_ids"] = encoded["token_type_ids"][index]
            examples.append(example)
        return examples

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(**self.model_inputs(batch)).logits.float()  # (batch, length, tags)
        return F.cross_entropy(
            logits.view(-1, logits.size(-1)),
            batch["labels"].view(-1),
            weight=self.weight(logits.device),
            ignore_index=IGNORE,
            reduction="sum",
        )

    @torch.no_grad()
    def predict(
        self, model: torch.nn.Module, examples: list[dict[str, Any]], device: torch.device
    ) -> tuple[list[list[str]], float]:
        """Predicted tags per word (words cut off by max_length get "O") and the summed loss."""
        model.eval()
        tags: list[list[str]] = [[] for _ in examples]
        total = 0.0
        for indices, batch in self.eval_batches(examples):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**self.model_inputs(batch)).logits.float()
            total += F.cross_entropy(
                logits.view(-1, logits.size(-1)),
                batch["labels"].view(-1),
                ignore_index=IGNORE,
                reduction="sum",
            ).item()
            best = logits.argmax(-1).cpu().numpy()
            for row, index in enumerate(indices):
                starts = examples[index]["word_starts"]
                tags[index] = [self.tags[best[row, s]] if s >= 0 else "O" for s in starts]
        return tags, total

    def report(
        self,
        model: torch.nn.Module,
        device: torch.device,
        examples: list[dict[str, Any]] | None = None,
        sentences: Sequence[TaggedSentence] | None = None,
    ) -> dict[str, Any]:
        examples = self.eval if examples is None else examples
        sentences = self.eval_sentences if sentences is None else sentences
        predicted, total = self.predict(model, examples, device)
        report = entity_report([s.tags for s in sentences], predicted)
        report["loss"] = total / max(1, sum(e["labels"].count(IGNORE) < len(e["labels"]) for e in examples))
        return report

    def collate(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return super().collate([{k: v for k, v in e.items() if k != "word_starts"} for e in examples])
