"""Pretraining objectives as loop tasks: `clm` (next token) and `mlm` (masked tokens, 80/10/10).

A task gives the loop three things (see `llmkernel.train.loop.Task`): the micro-batches of a step, a loss
as (sum over predicted tokens, number of predicted tokens), and an evaluation. Batches are a pure
function of (seed, step, micro-batch, rank), which is what makes resumed runs exact.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from llmkernel.data.loader import TokenShards
from llmkernel.train import dist


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token stands for; 0 for special tokens (they are left out of bits per byte).

    For byte-level BPE every character of a token's string is one byte (GPT-2's byte-to-unicode map);
    for other tokenizers the token is decoded on its own, which is exact for whole characters.
    """
    vocab_size = len(tokenizer)
    byte_level = "ByteLevel" in str(tokenizer.backend_tokenizer.decoder)
    pieces = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    lengths = np.zeros(vocab_size, dtype=np.int64)
    special = set(tokenizer.all_special_ids)
    for token_id, piece in enumerate(pieces):
        if token_id in special or piece is None:
            continue
        if byte_level:
            lengths[token_id] = len(piece)
        else:
            lengths[token_id] = len(piece.removeprefix("##").replace("\u2581", " ").encode())
    return lengths


def _slice(micro: int, count: int, rank: int, world_size: int) -> dict[str, int]:
    """Which rows of step's global batch a micro-batch takes: every (rank, micro-batch) pair gets its own.

    The global batch of a step is batch_size x count x world_size windows, so gradient accumulation and
    data parallelism see exactly the rows one process with the whole batch would.
    """
    return {"rank": rank * count + micro, "world_size": world_size * count}


def _eval_windows(
    shards: TokenShards, length: int, max_windows: int, rank: int, world_size: int
) -> list[int]:
    """Start positions of non-overlapping validation windows (covering the split in order), this rank's share."""
    count = min(max_windows, (shards.num_tokens - 1) // length)
    return list(range(rank, count, world_size))


class CausalLM:
    """Next-token prediction on random windows of the train shards."""

    name = "clm"

    def __init__(
        self, data_dir: str, tokenizer, batch_size: int, seq_len: int, seed: int, eval_batches: int
    ) -> None:
        self.train = TokenShards(data_dir, "train")
        self.val = TokenShards(data_dir, "val")
        self.batch_size, self.seq_len, self.seed, self.eval_batches = batch_size, seq_len, seed, eval_batches
        self.byte_lengths = torch.from_numpy(token_byte_lengths(tokenizer))
        self.tokenizer = tokenizer

    def micro_batches(
        self, step: int, count: int, rank: int, world_size: int
    ) -> list[dict[str, torch.Tensor]]:
        batches = []
        for micro in range(count):
            inputs, targets = self.train.batch(
                step, self.batch_size, self.seq_len, seed=self.seed, **_slice(micro, count, rank, world_size)
            )
            batches.append({"input_ids": inputs, "labels": targets})
        return batches

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["labels"].numel()

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits  # (batch, seq, vocab)
        return F.cross_entropy(
            logits.view(-1, logits.size(-1)).float(), batch["labels"].view(-1), reduction="sum"
        )

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, device: torch.device, rank: int, world_size: int
    ) -> dict[str, float]:
        """Validation loss, perplexity and bits per byte over non-overlapping windows of the val split."""
        totals = torch.zeros(4, dtype=torch.float64)  # loss nats, tokens, nats on byte tokens, bytes
        starts = _eval_windows(self.val, self.seq_len, self.eval_batches * self.batch_size, rank, world_size)
        for i in range(0, len(starts), self.batch_size):
            rows = [self.val.window(s, self.seq_len + 1) for s in starts[i : i + self.batch_size]]
            tokens = torch.from_numpy(np.stack(rows).astype(np.int64))
            inputs, labels = tokens[:, :-1].to(device), tokens[:, 1:]
            logits = model(input_ids=inputs, use_cache=False).logits.float().cpu()
            nats = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.reshape(-1), reduction="none")
            nbytes = self.byte_lengths[labels.reshape(-1)]
            totals += torch.tensor(
                [nats.sum().item(), nats.numel(), nats[nbytes > 0].sum().item(), nbytes.sum().item()],
                dtype=torch.float64,
            )
        totals = dist.all_reduce_sum(totals.to(device)).cpu()
        loss = (totals[0] / totals[1].clamp(min=1)).item()
        bits_per_byte = (totals[2] / math.log(2) / totals[3].clamp(min=1)).item()
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bits_per_byte": bits_per_byte}

    @torch.no_grad()
    def sample(self, model: torch.nn.Module, device: torch.device, max_new_tokens: int) -> str:
        """A short greedy-free sample continuing the first tokens of the val split."""
        prompt = torch.from_numpy(self.val.window(0, min(16, self.val.num_tokens)).astype(np.int64))[None].to(
            device
        )
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(
            self.seed
        )  # the same sample prompt and seed at every evaluation; loop RNG untouched
        output = model.generate(
            prompt,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=0.8,
            top_k=50,
            pad_token_id=self.tokenizer.pad_token_id or 0,
        )
        torch.random.set_rng_state(generator_state)
        return self.tokenizer.decode(output[0].tolist())


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


class MaskedLM:
    """Masked-token prediction (Devlin et al. 2019): 15% of tokens, 80% [MASK], 10% random, 10% unchanged."""

    name = "mlm"

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
            from llmkernel.errors import InputError

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

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["labels"].numel()

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
