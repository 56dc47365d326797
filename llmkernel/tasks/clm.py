"""`clm`: next-token prediction on random windows of token shards (pretraining), and perplexity and bits
per byte of a text file (`llmk evaluate` on a decoder).

Batches are a pure function of (seed, step, micro-batch, rank), which is what makes resumed runs exact.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from llmkernel import dist
from llmkernel.errors import InputError
from llmkernel.io.shards import TokenShards
from llmkernel.tasks.base import Task


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


class CausalLM(Task):
    """Next-token prediction on random windows of the train shards."""

    name = "clm"
    model_kind = "decoder"
    static_shapes = True  # every batch is (batch_size, seq_len): torch.compile compiles once
    preset = "decoder"  # the models.presets family a fresh model is built from

    @classmethod
    def from_shards(cls, data_dir: str, tokenizer, train: Any, mask_probability: float = 0.0) -> CausalLM:
        """The objective on a prepared folder with the loop settings `train` (TrainConfig)."""
        return cls(data_dir, tokenizer, train.batch_size, train.seq_len, train.seed, train.eval_batches)

    def head_fraction(self) -> float:
        """Share of positions the LM head runs on (for FLOPs per token): all of them."""
        return 1.0

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


class TextFileLM:
    """`llmk evaluate` of a decoder on a text file: perplexity and bits per byte (bytes of the file's UTF-8
    text, so any tokenizer compares), over non-overlapping windows of `max_length` tokens."""

    name = "lm"
    model_kind = "decoder"
    headline = ("loss", "perplexity", "bits_per_byte")
    attackable = False

    def __init__(self, tokenizer, path: str, max_length: int) -> None:
        self.tokenizer, self.path, self.max_length = tokenizer, path, max_length
        self.progress = False

    @classmethod
    def accepts(cls, path: str | Path) -> bool:
        return True

    @classmethod
    def for_evaluation(
        cls, path, model, tokenizer, max_length: int, batch_size: int, columns: dict, limit: int
    ):
        file = Path(path)
        if not file.is_file():
            raise InputError(f"{path}: file not found; pass a UTF-8 text file")
        return cls(tokenizer, path, max_length)

    @torch.no_grad()
    def report(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        text = Path(self.path).read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise InputError(f"{self.path}: the file is empty")
        ids = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        nats, predicted = 0.0, 0
        starts = range(0, max(1, len(ids) - 1), self.max_length)
        for start in tqdm(starts, desc="evaluating", unit="window", disable=not self.progress, leave=False):
            window = ids[start : start + self.max_length + 1][None]
            if window.shape[1] < 2:
                break
            logits = model(input_ids=window[:, :-1].to(device), use_cache=False).logits.float().cpu()
            nats += F.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
            predicted += window.shape[1] - 1
        loss = nats / max(1, predicted)
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": nats / math.log(2) / len(text.encode("utf-8")),
            "tokens": predicted,
        }

    def final_report(self, model: torch.nn.Module, device: torch.device, sample_tokens: int) -> dict:
        return self.report(model, device)

    def calibration_batches(self, count: int, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
        """The file's first `count` windows of `max_length` tokens, `batch_size` per batch."""
        text = Path(self.path).read_text(encoding="utf-8", errors="replace")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        windows = [ids[i : i + self.max_length] for i in range(0, len(ids), self.max_length)][:count]
        windows = [w for w in windows if len(w) == self.max_length] or windows[:1]
        if not windows or not windows[0]:
            raise InputError(f"{self.path}: no text to calibrate on")
        return [
            {"input_ids": torch.tensor(windows[i : i + batch_size])}
            for i in range(0, len(windows), batch_size)
        ]

    def format_report(self, report: dict) -> str:
        from llmkernel.tasks.report import format_headline

        return format_headline(self.headline, report)

    def write_figures(self, out: Path, report: dict, title: str, suffix: str = "") -> None:
        """No figures for a language model."""
