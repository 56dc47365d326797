"""`mlm`: masked-token prediction for encoders (Devlin et al. 2019): 15% of tokens, 80/10/10."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmkernel import dist
from llmkernel.errors import InputError
from llmkernel.io.shards import TokenShards
from llmkernel.tasks.base import Task
from llmkernel.tasks.clm import _eval_windows, _slice


class MaskedPositionsLM(torch.nn.Module):
    """Runs a BERT-style MLM model's prediction head only at the masked positions.

    The head (transform + vocabulary projection) costs about as much as several encoder layers when run
    on every position; only ~15% of positions are predicted, so this saves most of it.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        encoder = getattr(self.model, self.model.base_model_prefix)
        hidden = encoder(input_ids=input_ids).last_hidden_state  # (batch, seq, width)
        return self.model.cls(hidden[positions])  # (masked, vocab): BertForMaskedLM's prediction head


class MaskedLM(Task):
    """Masked-token prediction (Devlin et al. 2019): 15% of tokens, 80% [MASK], 10% random, 10% unchanged."""

    name = "mlm"
    model_kind = "masked_lm"
    static_shapes = False  # the number of masked positions changes every step
    preset = "encoder"  # the models.presets family a fresh model is built from

    @classmethod
    def from_shards(cls, data_dir: str, tokenizer, train: Any, mask_probability: float) -> MaskedLM:
        """The objective on a prepared folder with the loop settings `train` (TrainConfig)."""
        return cls(
            data_dir,
            tokenizer,
            train.batch_size,
            train.seq_len,
            train.seed,
            train.eval_batches,
            mask_probability,
        )

    def head_fraction(self) -> float:
        """Share of positions the prediction head runs on (for FLOPs per token): the masked ones."""
        return self.probability

    def __init__(
        self,
        data_dir: str,
        tokenizer,
        batch_size: int,
        seq_len: int,
        seed: int,
        eval_batches: int,
        probability: float,
    ) -> None:
        self.train = TokenShards(data_dir, "train")
        self.val = TokenShards(data_dir, "val")
        self.batch_size, self.seq_len, self.seed, self.eval_batches = batch_size, seq_len, seed, eval_batches
        self.probability = probability
        self.mask_id = tokenizer.mask_token_id
        if self.mask_id is None:
            raise InputError(
                "objective mlm needs a tokenizer with a [MASK] token: prepare with --tokenizer.kind wordpiece"
            )
        self.vocab_size = len(tokenizer)
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)

    def _mask(self, tokens: torch.Tensor, step: int, first_row: int) -> dict[str, torch.Tensor]:
        """Mask a (rows, seq) batch. Row r's mask depends only on (seed, step, first_row + r), so the masks
        are the same however a step's global batch is split over micro-batches and ranks."""
        draws, actions, randoms = [], [], []
        for row in range(tokens.shape[0]):
            key = hash((self.seed, step, first_row + row)) & 0x7FFF_FFFF_FFFF_FFFF
            generator = torch.Generator().manual_seed(key)
            draws.append(torch.rand(tokens.shape[1], generator=generator))
            actions.append(torch.rand(tokens.shape[1], generator=generator))
            randoms.append(torch.randint(0, self.vocab_size, (tokens.shape[1],), generator=generator))
        positions = (torch.stack(draws) < self.probability) & ~torch.isin(tokens, self.special)
        action, random_tokens = torch.stack(actions)[positions], torch.stack(randoms)[positions]
        labels = tokens[positions]
        inputs = tokens.clone()
        replaced = torch.where(action < 0.8, torch.full_like(labels, self.mask_id), labels)  # 80% [MASK]
        inputs[positions] = torch.where(
            (action >= 0.8) & (action < 0.9), random_tokens, replaced
        )  # 10% random
        return {"input_ids": inputs, "positions": positions, "labels": labels}

    def micro_batches(
        self, step: int, count: int, rank: int, world_size: int
    ) -> list[dict[str, torch.Tensor]]:
        batches = []
        for micro in range(count):
            tokens, _ = self.train.batch(
                step, self.batch_size, self.seq_len, seed=self.seed, **_slice(micro, count, rank, world_size)
            )
            batches.append(self._mask(tokens, step, (rank * count + micro) * self.batch_size))
        return batches

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return MaskedPositionsLM(model)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["input_ids"], batch["positions"])  # (masked tokens, vocab)
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, device: torch.device, rank: int, world_size: int
    ) -> dict[str, float]:
        """Validation loss and masked-token accuracy, and the unigram baseline's accuracy for comparison."""
        head = MaskedPositionsLM(model)
        totals = torch.zeros(3, dtype=torch.float64)  # nats, masked tokens, correct
        counts = torch.zeros(self.vocab_size, dtype=torch.float64)
        starts = _eval_windows(self.val, self.seq_len, self.eval_batches * self.batch_size, rank, world_size)
        for i in range(0, len(starts), self.batch_size):
            rows = [self.val.window(s, self.seq_len) for s in starts[i : i + self.batch_size]]
            tokens = torch.from_numpy(np.stack(rows).astype(np.int64))
            batch = self._mask(tokens, -1, starts[i])
            logits = head(batch["input_ids"].to(device), batch["positions"].to(device)).float().cpu()
            labels = batch["labels"]
            nats = F.cross_entropy(logits, labels, reduction="sum")
            totals += torch.tensor([nats.item(), labels.numel(), (logits.argmax(-1) == labels).sum().item()])
            counts += torch.bincount(labels, minlength=self.vocab_size).double()
        totals = dist.all_reduce_sum(totals.to(device)).cpu()
        counts = dist.all_reduce_sum(counts.to(device)).cpu()
        n = totals[1].clamp(min=1)
        loss = (totals[0] / n).item()
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "masked_accuracy": (totals[2] / n).item(),
            "unigram_baseline_accuracy": (counts.max() / n).item(),
        }
