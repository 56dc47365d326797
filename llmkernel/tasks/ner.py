"""`ner`: named-entity recognition, one tag per word on the word's first sub-token (BERT's convention)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from llmkernel.errors import InputError
from llmkernel.io.conll import TaggedSentence, read_conll, tag_names
from llmkernel.tasks import report as reports
from llmkernel.tasks.base import IGNORE, SupervisedTask, default_max_length, read_train_and_eval
from llmkernel.tasks.metrics import entity_report


@dataclass
class EncodedSentence:
    """A sentence's sub-word ids, the label of each (first sub-token of a word) and where each word starts."""

    input_ids: list[int]
    labels: list[int]
    word_starts: list[int]  # token index of each word's first sub-token, -1 if truncated away or empty


class TokenClassify(SupervisedTask):
    """Named-entity recognition: one tag per word, on the word's first sub-token (BERT's convention)."""

    name = "ner"
    model_kind = "token_classifier"
    peft_task_type = "TOKEN_CLS"
    default_metric = "f1"
    headline = ("f1", "precision", "recall", "token_accuracy")

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

    @classmethod
    def from_training_files(
        cls, tokenizer, model_config, data: Any, seed: int, batch_size: int, max_length: int
    ):
        """The task with the CoNLL files `data.train` (and `data.eval`, or a held-out share) read and encoded."""
        train, evaluation = read_train_and_eval(read_conll, data, seed)
        tags = tag_names(train)
        unknown = sorted({t for s in evaluation for t in s.tags} - set(tags))
        if unknown:
            raise InputError(
                f"tags in {data.eval or data.train} missing from the training data: {', '.join(unknown[:5])}; "
                "every evaluation tag must occur in training"
            )
        if not max_length:
            encoded = tokenizer([s.tokens for s in train[:20000]], is_split_into_words=True)
            max_length = default_max_length(
                [len(ids) for ids in encoded["input_ids"]], model_config, data.train
            )
        task = cls(tokenizer, tags, max_length, batch_size, seed)
        task.set_train(task.encode(train))
        task.eval, task.eval_sentences = task.encode(evaluation), evaluation
        return task

    @classmethod
    def for_evaluation(
        cls, path: str, model, tokenizer, max_length: int, batch_size: int, columns: dict, limit: int
    ):
        """The task with the tags the model knows and the CoNLL file `path` as its evaluation set."""
        tags = [model.config.id2label[i] for i in range(len(model.config.id2label))]
        sentences = read_conll(path)[: limit or None]
        unknown = sorted({t for s in sentences for t in s.tags} - set(tags))
        if unknown:
            raise InputError(f"tags in {path} unknown to the model: {', '.join(unknown[:5])}")
        task = cls(tokenizer, tags, max_length, batch_size)
        task.eval, task.eval_sentences = task.encode(sentences), sentences
        return task

    def perturbed(self, edit: Callable[[list[str], int], list[str]]) -> list[dict[str, Any]]:
        """The evaluation sentences with `edit(words, index)` applied to their tokens (tags unchanged)."""
        return self.encode([replace(s, tokens=edit(s.tokens, i)) for i, s in enumerate(self.eval_sentences)])

    def format_report(self, report: dict[str, Any]) -> str:
        return reports.format_entity_report(report)

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
