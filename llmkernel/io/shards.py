"""Memory-mapped token shards (the output of `llmk prepare`) as batches for pretraining.

`TokenShards(data_dir, split)` maps the split's shard files read-only, so the corpus is never loaded
into memory and every process (one per GPU) shares the OS page cache. Batches are random windows whose
positions depend only on (seed, step): a resumed run needs nothing but the step number, and data-parallel
ranks take disjoint rows of one global batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmkernel.errors import InputError

if TYPE_CHECKING:  # torch only where batches are made: `llmk prepare` imports this module for its names
    import torch

FORMAT = "llmk-shards-v1"  # the `format` of shards.json
SHARDS_FILE = "shards.json"

# Tokens read per step when scanning a split for documents: bounds memory, keeps numpy vectorised.
_SCAN_TOKENS = 1 << 20


def read_shards_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The shards.json of `data_dir`, checked; InputError when the folder holds no token shards."""
    data_dir = Path(data_dir)
    hint = f"run `llmk prepare ... --out {data_dir}` first"
    path = data_dir / SHARDS_FILE
    if not path.is_file():
        raise InputError(f"no token shards in {data_dir}: {hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path} is not valid JSON ({error}): {hint}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{path} is not an {FORMAT} manifest: {hint}")
    return manifest


class TokenShards:
    """One split (train or val) of a token-shard folder, memory-mapped read-only."""

    def __init__(self, data_dir: str | Path, split: str = "train") -> None:
        self.data_dir = Path(data_dir)
        self.split = split
        manifest = read_shards_manifest(self.data_dir)
        splits = manifest.get("splits", {})
        if split not in splits:
            raise InputError(
                f"no {split!r} split in {self.data_dir / SHARDS_FILE}: use one of {', '.join(sorted(splits))}"
            )
        self.vocab_size: int = int(manifest["vocab_size"])
        self.separator_id: int = int(manifest["separator_id"])
        self.dtype = np.dtype(manifest["dtype"])
        self._shards = [self._map(shard) for shard in splits[split]["shards"]]
        lengths = [len(shard) for shard in self._shards]
        # _starts[i] is the global position of shard i's first token; the last entry is the total.
        self._starts = np.cumsum([0, *lengths])
        self.num_tokens = int(self._starts[-1])
        if self.num_tokens == 0:
            raise InputError(
                f"no token shards in the {split} split of {self.data_dir}: run `llmk prepare ... --out "
                f"{self.data_dir}` first with more text{' and pack.val_fraction > 0' if split == 'val' else ''}"
            )

    def _map(self, shard: dict[str, Any]) -> np.memmap:
        path = self.data_dir / shard["file"]
        expected = int(shard["tokens"]) * self.dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise InputError(
                f"token shard {path} is missing or not {expected} bytes as shards.json says: "
                f"run `llmk prepare ... --out {self.data_dir}` again"
            )
        return np.memmap(path, dtype=self.dtype, mode="r")

    # Pickled (e.g. to DataLoader workers started with spawn) as its folder and split, then mapped again,
    # instead of copying the memory-mapped tokens.
    def __getstate__(self) -> dict[str, Any]:
        return {"data_dir": self.data_dir, "split": self.split}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["data_dir"], state["split"])

    def __repr__(self) -> str:
        return f"TokenShards({str(self.data_dir)!r}, split={self.split!r}, tokens={self.num_tokens})"

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split, read across shard boundaries."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(
                f"window [{start}, {start + length}) outside the split's {self.num_tokens} tokens"
            )
        out = np.empty(length, dtype=self.dtype)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        filled = 0
        while filled < length:
            local = start + filled - int(self._starts[shard])
            take = min(length - filled, len(self._shards[shard]) - local)
            out[filled : filled + take] = self._shards[shard][local : local + take]
            filled += take
            shard += 1
        return out

    def batch(
        self, step: int, batch_size: int, seq_len: int, *, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) int64 tensors of shape (batch_size, seq_len) for this rank at `step`.

        The global batch is batch_size * world_size random windows drawn from a generator seeded by
        (seed, step) alone; rank r takes rows [r * batch_size, (r + 1) * batch_size).
        """
        if batch_size < 1 or seq_len < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch({batch_size=}, {seq_len=}, {rank=}, {world_size=})")
        span = seq_len + 1  # one extra token: targets are the inputs shifted by one
        if self.num_tokens < span:
            raise InputError(
                f"the {self.split} split of {self.data_dir} has {self.num_tokens} tokens, fewer than "
                f"seq_len + 1 = {span}: lower seq_len or prepare more text"
            )
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, self.num_tokens - span + 1, size=batch_size * world_size)
        rows = np.stack(
            [self.window(int(s), span) for s in starts[rank * batch_size : (rank + 1) * batch_size]]
        )
        import torch

        tokens = torch.from_numpy(rows.astype(np.int64))
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def iter_documents(self) -> Iterator[np.ndarray]:
        """The token ids of each document in order, without separators (documents may span shards)."""
        pending: list[np.ndarray] = []  # the start of a document whose separator is in a later block
        for shard in self._shards:
            for offset in range(0, len(shard), _SCAN_TOKENS):
                block = np.array(shard[offset : offset + _SCAN_TOKENS])
                begin = 0
                for end in np.flatnonzero(block == self.separator_id):
                    yield np.concatenate([*pending, block[begin:end]]) if pending else block[begin:end]
                    pending = []
                    begin = int(end) + 1
                if begin < len(block):
                    pending.append(block[begin:])
        if pending:  # tokens after the last separator (not written by pack_documents, but possible)
            yield np.concatenate(pending)
