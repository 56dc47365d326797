"""What every task shares: the loop's task protocol with its optional parts, length-grouped batches,
padding, and the supervised base that classify, ner and sft build on.

A task is one object that owns its work: reading and encoding its data, the kind of model it trains (and
so the HF auto class and the peft task type), batches, loss, predictions, metrics, its printed report and
samples. The loop (`llmkernel.train.loop`) sees only `Task`; `llmk finetune` and `llmk evaluate` build
supervised tasks from files with `from_training_files` and `for_evaluation`.

A supervised task tokenizes its labeled examples once, then gives the loop length-grouped, dynamically
padded micro-batches: a pure function of (seed, step, rank), so a resumed run sees the batches an
uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from llmkernel import dist
from llmkernel.errors import InputError
from llmkernel.tasks import report as reports

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


class Task:
    """What the one training loop needs from a task; `wrap` and `sample` are optional (these defaults)."""

    name = ""

    def micro_batches(
        self, step: int, count: int, rank: int, world_size: int
    ) -> list[dict[str, torch.Tensor]]:
        """The `count` micro-batches of optimizer step `step` for this rank (a pure function of its arguments)."""
        raise NotImplementedError

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Number of predictions whose loss `loss` sums for this micro-batch (known before the forward)."""
        return batch["labels"].numel()

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the per-prediction losses of one micro-batch."""
        raise NotImplementedError

    def evaluate(
        self, model: torch.nn.Module, device: torch.device, rank: int, world_size: int
    ) -> dict[str, float]:
        """Validation metrics. Collective: every rank calls it (an FSDP forward needs every rank)."""
        raise NotImplementedError

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the training forward runs (e.g. a head only at the predicted positions)."""
        return model

    def sample(self, model: torch.nn.Module, device: torch.device, max_new_tokens: int) -> str | None:
        """Text shown at each evaluation (decoders), or None. Collective like `evaluate`."""
        return None


class SupervisedTask(Task):
    """What classify, ner and sft share: encoded examples, batching, padding, the loop's batch API, and the
    parts `llmk finetune` and `llmk evaluate` ask every task for."""

    name = "supervised"
    model_kind = ""  # the kind of model folder it trains and evaluates (models.loading.AUTO_CLASSES)
    peft_task_type = ""  # peft's TaskType for LoRA
    metrics: tuple[str, ...] = ()  # what `evaluate` reports; `eval_metric` picks one of them
    headline: tuple[str, ...] = ()  # the metrics shown side by side, clean and attacked
    default_metric = "loss"
    lower_is_better = ("loss", "perplexity", "bits_per_byte")
    attackable = True  # text and HotFlip attacks apply (labels are compared per example or word)
    uses_class_weights = True  # labels may be weighted by inverse frequency (--data.class_weights)
    example_unit = "examples"
    target_steps = 0  # optimizer steps the default epochs aim at (0: llmk finetune's rule, ~800)
    lr_scale = 1.0  # the default learning rate (llmk finetune's, by method and width) times this
    group_by_length = True  # batches of similar lengths (LengthGroupedBatches); --data.group_by_length

    def __init__(self, tokenizer, max_length: int, batch_size: int, seed: int) -> None:
        self.tokenizer = tokenizer
        self.max_length, self.batch_size, self.seed = max_length, batch_size, seed
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.train: list[dict[str, list[int]]] = []
        self.eval: list[dict[str, list[int]]] = []
        self.batches: LengthGroupedBatches | None = None
        self.progress = False  # a progress bar over evaluation batches (llmk evaluate --progress)

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
            [len(e["input_ids"]) for e in examples], self.batch_size, self.seed, self.group_by_length
        )

    def use_length_grouping(self, setting: str) -> None:
        """--data.group_by_length: "auto" keeps the task's default; "true"/"false" rebuild the batches."""
        if setting != "auto" and (setting == "true") != self.group_by_length:
            self.group_by_length = setting == "true"
            self.set_train(self.train)

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

    def final_report(
        self, model: torch.nn.Module, device: torch.device, sample_tokens: int
    ) -> dict[str, Any]:
        """What eval.json holds for the evaluation set: the report, plus samples where the task has them."""
        return self.report(model, device)

    def evaluate(
        self, model: torch.nn.Module, device: torch.device, rank: int, world_size: int
    ) -> dict[str, float]:
        """The loop's evaluation: the task's `metrics` from `report` on the whole evaluation set. Every
        rank computes it (the sets are small, and a sharded model's forward needs every rank); rank 0's
        figures are the ones every rank returns."""
        report = self.report(model, device)
        return dist.broadcast_object({k: report[k] for k in self.metrics})

    # ---------------------------------------------------------------- what finetune and evaluate ask for

    def new_head(self) -> dict[str, Any] | None:
        """Settings of a fresh head for this task's labels (`models.loading.load_model`), or None when the
        task has no labels of its own (the model's head is used)."""
        if not self.names:
            return None
        return {
            "num_labels": len(self.names),
            "id2label": dict(enumerate(self.names)),
            "label2id": {n: i for i, n in enumerate(self.names)},
            "pad_token_id": self.tokenizer.pad_token_id,
        }

    @classmethod
    def head_modules(cls, model: torch.nn.Module) -> list[str]:
        """Modules that train in full under LoRA: the new task head (and BERT's pooler, which it reads)."""
        names = {n for n, child in model.named_children() if any(True for _ in child.parameters())}
        names -= {model.base_model_prefix}
        base = getattr(model, model.base_model_prefix, None)
        if base is not None and getattr(base, "pooler", None) is not None:
            names.add("pooler")
        return sorted(names)

    @classmethod
    def accepts(cls, path: str | Path) -> bool:
        """Whether a data file looks like this task's (for telling decoder tasks apart by the file)."""
        return True

    def format_report(self, report: dict[str, Any]) -> str:
        """The printed table: the headline metrics, then any samples."""
        return reports.format_headline(self.headline, report)

    def write_figures(self, out: Path, report: dict[str, Any], title: str, suffix: str = "") -> None:
        """Figures beside eval.json (classification: the confusion matrix); none by default."""

    def perturbed(self, edit: Callable[[list[str], int], list[str]]) -> list[dict[str, Any]]:
        """The evaluation examples with `edit(words, example_index)` (a seeded text attack) applied."""
        raise NotImplementedError

    @staticmethod
    def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def calibration_batches(self, count: int) -> list[dict[str, torch.Tensor]]:
        """Model inputs of the first `count` evaluation examples, in batches (pruning and quantization
        measure activations on them)."""
        return [self.model_inputs(batch) for _, batch in self.eval_batches(self.eval[:count])]

    def eval_batches(self, examples: list[dict[str, Any]], rank: int = 0, world_size: int = 1):
        """(indices, batch) over this rank's share of `examples`, longest first (little padding)."""
        order = np.argsort([-len(e["input_ids"]) for e in examples], kind="stable")[rank::world_size]
        starts = range(0, len(order), self.batch_size)
        for i in tqdm(starts, desc="evaluating", unit="batch", disable=not self.progress, leave=False):
            indices = order[i : i + self.batch_size]
            yield indices, self.collate([examples[j] for j in indices])


def split_held_out(items: Any, fraction: float, seed: int, take: Callable[[Any, np.ndarray], Any]):
    """(train, held out): a seeded `fraction` of `items` held out for evaluation (at least one)."""
    order = np.random.default_rng(seed).permutation(len(items))
    cut = max(1, int(len(order) * fraction))
    return take(items, order[cut:]), take(items, order[:cut])


def pick(items: Sequence[Any], indices: np.ndarray) -> list[Any]:
    return [items[i] for i in indices]


def read_train_and_eval(read: Callable[[str], Sequence[Any]], data: Any, seed: int) -> tuple[list, list]:
    """(train, evaluation) items of a list-shaped file format: `data.train` (its first `data.limit`), and
    `data.eval` or else a seeded `data.eval_fraction` of train held out."""
    train = list(read(data.train))[: data.limit or None]
    if data.eval:
        return train, list(read(data.eval))
    return split_held_out(train, data.eval_fraction, seed, pick)


def default_max_length(counted: list[int], model_config: Any, path: str, limit: int | None = None) -> int:
    """Long enough for 99.5% of the training examples (a multiple of 8), within the model's context.

    `counted` are the token lengths of (a sample of) the training examples: tokenizing is the cost, so
    tasks count the first few thousand. Dynamic padding makes a generous bound cheap; only the rare
    outliers beyond it are truncated.
    """
    context = getattr(model_config, "max_position_embeddings", None) or 2048
    if not counted:
        raise InputError(f"{path}: no examples")
    bound = int(math.ceil(np.percentile(counted, 99.5) / 8) * 8)
    return int(min(context, limit or context, max(8, bound)))
