"""`seq2seq`: translation (or any text-to-text pairs) with an encoder-decoder, a task for the one loop.

Training is teacher forcing: the encoder reads the source, the decoder reads the target shifted right by
one (it starts from the model's `decoder_start_token_id`) and predicts every target token, with label
smoothing (Szegedy et al. 2016; 0.1 as in Vaswani et al. 2017). Evaluation translates the evaluation
sources with beam search and scores them against the references with sacreBLEU's corpus BLEU and chrF;
the loss on the references (without smoothing) is reported beside them.

Both sides end with the tokenizer's eos token, so the model learns where a translation stops. A tokenizer
that does not know a language (a BPE trained on English only, given Chinese) is refused up front.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmkernel.errors import InputError
from llmkernel.io.pairs import Pairs, check_tokenizer_covers, is_table, read_pairs
from llmkernel.tasks.base import IGNORE, SupervisedTask, default_max_length, pad, split_held_out
from llmkernel.tasks.metrics import translation_scores

SAMPLES = 5  # sample translations in the report


def _take(pairs: Pairs, indices) -> Pairs:
    return Pairs(
        [pairs.sources[i] for i in indices],
        [pairs.targets[i] for i in indices],
        pairs.source_column,
        pairs.target_column,
        pairs.path,
    )


class Seq2Seq(SupervisedTask):
    """Source -> target generation with an encoder-decoder: teacher forcing, label smoothing, beam search."""

    name = "seq2seq"
    model_kind = "seq2seq"
    peft_task_type = "SEQ_2_SEQ_LM"
    default_metric = "bleu"
    metrics = ("bleu", "chrf", "loss")
    headline = ("bleu", "chrf", "loss")
    lower_is_better = ("loss", "perplexity")
    attackable = False
    uses_class_weights = False
    example_unit = "sentence pairs"
    # Random batches, as the HF Trainer's default sampler: a model trained from scratch learns far slower
    # from batches of one length. seq2seq-small on Tatoeba zh->en, batch 64, lr 1e-3, 2 cores: after the
    # first epoch (408 steps) dev greedy BLEU 3.11 / loss 3.59 in random order, 0.10 / 4.13 length-grouped
    # (grouped pads less: 149 pairs/s vs 115).
    group_by_length = False

    def __init__(
        self,
        tokenizer,
        max_length: int,
        batch_size: int,
        seed: int = 0,
        label_smoothing: float = 0.1,
        num_beams: int = 4,
        decoder_start_id: int | None = None,
    ) -> None:
        super().__init__(tokenizer, max_length, batch_size, seed)
        self.label_smoothing, self.num_beams = label_smoothing, num_beams
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if self.eos_id is None:
            raise InputError(
                f"{tokenizer.name_or_path}: the tokenizer has no eos token to end sentences with"
            )
        self.decoder_start_id = self.eos_id if decoder_start_id is None else decoder_start_id
        self.eval_pairs: Pairs | None = None

    # ------------------------------------------------------------------------------------ data

    @classmethod
    def accepts(cls, path: str | Path) -> bool:
        return is_table(path)

    @classmethod
    def from_training_files(
        cls, tokenizer, model_config, data: Any, seed: int, batch_size: int, max_length: int
    ):
        """The task with the pairs of `data.train` (and `data.eval`, or a held-out share) encoded."""
        columns = (data.source_column, data.target_column)
        train = read_pairs(data.train, *columns, limit=data.limit)
        columns = (train.source_column, train.target_column)
        if data.eval:
            evaluation = read_pairs(data.eval, *columns)
        else:
            train, evaluation = split_held_out(train, data.eval_fraction, seed, _take)
        check_tokenizer_covers(tokenizer, train.sources[:2000], f"{data.train} ({train.source_column})")
        check_tokenizer_covers(tokenizer, train.targets[:2000], f"{data.train} ({train.target_column})")
        task = cls(
            tokenizer,
            max_length,
            batch_size,
            seed,
            label_smoothing=data.label_smoothing,
            num_beams=data.num_beams,
            decoder_start_id=getattr(model_config, "decoder_start_token_id", None),
        )
        if not max_length:
            texts = train.sources + train.targets  # every pair: files are often sorted by length
            counted = [len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
            task.max_length = default_max_length(counted, model_config, data.train, limit=256)
        task.set_train(task.encode(train))
        task.eval, task.eval_pairs = task.encode(evaluation), evaluation
        return task

    @classmethod
    def for_evaluation(
        cls, path: str, model, tokenizer, max_length: int, batch_size: int, columns: dict, limit: int
    ):
        """The task with the pairs of `path` as its evaluation set (`columns`: source/target columns, beams)."""
        pairs = read_pairs(path, columns.get("source_column"), columns.get("target_column"), limit=limit)
        check_tokenizer_covers(tokenizer, pairs.sources[:2000], f"{path} ({pairs.source_column})")
        task = cls(
            tokenizer,
            max_length,
            batch_size,
            num_beams=columns.get("num_beams") or 4,
            decoder_start_id=getattr(model.config, "decoder_start_token_id", None),
        )
        task.eval, task.eval_pairs = task.encode(pairs), pairs
        return task

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text with eos at the end, cut to max_length (eos kept)."""
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [row[: self.max_length - 1] + [self.eos_id] for row in ids]

    def encode(self, pairs: Pairs) -> list[dict[str, list[int]]]:
        sources, targets = self.encode_texts(pairs.sources), self.encode_texts(pairs.targets)
        return [{"input_ids": s, "labels": t} for s, t in zip(sources, targets)]

    def collate(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Sources padded, the targets as labels (IGNORE-padded) and, shifted right, as decoder inputs."""
        ids = [e["input_ids"] for e in examples]
        labels = [e["labels"] for e in examples]
        return {
            "input_ids": pad(ids, self.pad_id),
            "attention_mask": pad([[1] * len(row) for row in ids], 0),
            "decoder_input_ids": pad([[self.decoder_start_id] + row[:-1] for row in labels], self.pad_id),
            "labels": pad(labels, IGNORE),
        }

    # ------------------------------------------------------------------------------------ the loop's part

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE).sum())

    @staticmethod
    def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids") if k in batch}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(**self.model_inputs(batch)).logits.float()  # (batch, target length, vocab)
        return F.cross_entropy(
            logits.flatten(0, 1),
            batch["labels"].flatten(),
            ignore_index=IGNORE,
            label_smoothing=self.label_smoothing,
            reduction="sum",
        )

    @classmethod
    def head_modules(cls, model: torch.nn.Module) -> list[str]:
        return []  # the LM head is the model's own, tied to the shared embeddings

    # ------------------------------------------------------------------------------------ translating

    @torch.no_grad()
    def translate(
        self, model, sources: Sequence[list[int]], device: torch.device, num_beams: int | None = None
    ) -> list[str]:
        """Translations of encoded sources (beam search; greedy at 1 beam), longest first in batches."""
        model.eval()
        examples = [{"input_ids": ids, "labels": [self.eos_id]} for ids in sources]
        out = [""] * len(examples)
        for indices, batch in self.eval_batches(examples):
            output = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                num_beams=num_beams or self.num_beams,
                max_new_tokens=min(self.max_length, 2 * batch["input_ids"].shape[1] + 10),
                decoder_start_token_id=self.decoder_start_id,
                eos_token_id=self.eos_id,
                pad_token_id=self.pad_id,
                do_sample=False,
            )
            texts = self.tokenizer.batch_decode(output.tolist(), skip_special_tokens=True)
            for index, text in zip(indices, texts):
                out[index] = text.strip()
        return out

    def evaluate(
        self, model: torch.nn.Module, device: torch.device, rank: int, world_size: int
    ) -> dict[str, float]:
        """The loop's evaluations translate greedily (cheaper than beam search, which costs about `num_beams`
        times the decoding); the final report and `llmk evaluate` use the beams."""
        beams, self.num_beams = self.num_beams, 1
        try:
            return super().evaluate(model, device, rank, world_size)
        finally:
            self.num_beams = beams

    @torch.no_grad()
    def report(
        self, model: torch.nn.Module, device: torch.device, examples: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """BLEU and chrF of the beam-search translations of the evaluation sources, and the reference loss."""
        model.eval()
        examples = self.eval if examples is None else examples
        nats, tokens = 0.0, 0
        for _, batch in self.eval_batches(examples):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**self.model_inputs(batch)).logits.float()
            nats += F.cross_entropy(
                logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE, reduction="sum"
            ).item()
            tokens += self.count(batch)
        hypotheses = self.translate(model, [e["input_ids"] for e in examples], device)
        references = self.eval_pairs.targets if self.eval_pairs is not None else [""] * len(examples)
        loss = nats / max(1, tokens)
        report = {
            **translation_scores(hypotheses, references),
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "num_beams": self.num_beams,
            "sentences": len(examples),
        }
        sources = self.eval_pairs.sources if self.eval_pairs is not None else [""] * len(examples)
        report["samples"] = [
            {"prompt": s, "reference": r, "reply": h}
            for s, r, h in list(zip(sources, references, hypotheses))[:SAMPLES]
        ]
        return report

    def format_report(self, report: dict[str, Any]) -> str:
        lines = [f"{name:>14}  {report[name]:.4f}" for name in self.headline if name in report]
        lines.append(f"{'':>14}  {report.get('sentences', 0)} sentences, beam {report.get('num_beams')}")
        lines.append(f"{'':>14}  {report.get('bleu_signature', '')}")
        for sample in report.get("samples", []):
            lines.append(f"\nsource:      {sample['prompt'][:200]}\nreference:   {sample['reference'][:200]}")
            lines.append(f"translation: {sample['reply'][:200]}")
        return "\n".join(lines)

    def sample(self, model: torch.nn.Module, device: torch.device, max_new_tokens: int) -> str:
        """The greedy translation of the first evaluation source (shown at each evaluation)."""
        if not self.eval:
            return ""
        source = self.eval_pairs.sources[0] if self.eval_pairs is not None else ""
        return f"{source} -> {self.translate(model, [self.eval[0]['input_ids']], device, num_beams=1)[0]}"
