"""Memory-mapped token shards as pretraining batches (llmkernel.io.shards)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from llmkernel.errors import InputError
from llmkernel.io.shards import TokenShards


def write_shards(
    folder: Path, splits: dict[str, list[np.ndarray]], dtype: str = "uint32", separator: int = 0
) -> Path:
    """A shard folder in the llmk-shards-v1 layout with the given token arrays as shard files."""
    manifest: dict = {
        "format": "llmk-shards-v1",
        "dtype": dtype,
        "vocab_size": 100_000,
        "separator_id": separator,
        "tokenizer": "tokenizer",
        "seed": 0,
        "splits": {},
    }
    for split, arrays in splits.items():
        (folder / split).mkdir(parents=True, exist_ok=True)
        shards = []
        for i, array in enumerate(arrays):
            name = f"{split}/shard_{i:05d}.bin"
            array.astype(dtype).tofile(folder / name)
            shards.append({"file": name, "tokens": len(array)})
        manifest["splits"][split] = {"documents": 0, "tokens": sum(len(a) for a in arrays), "shards": shards}
    (folder / "shards.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture()
def counting(tmp_path: Path) -> TokenShards:
    """2548 tokens 0, 1, 2, ... in three shards of 1024, 1024 and 500: every window is a run of integers."""
    tokens = np.arange(2548)
    write_shards(tmp_path, {"train": [tokens[:1024], tokens[1024:2048], tokens[2048:]], "val": [tokens[:10]]})
    return TokenShards(tmp_path)


def test_window_across_shard_boundaries(counting: TokenShards) -> None:
    assert counting.num_tokens == 2548 and counting.dtype == np.uint32
    assert counting.window(1000, 100).tolist() == list(range(1000, 1100))
    assert counting.window(1020, 1100).tolist() == list(range(1020, 2120))  # spans all three shards
    assert counting.window(2540, 8).tolist() == list(range(2540, 2548))
    assert counting.window(0, 0).size == 0
    with pytest.raises(IndexError):
        counting.window(2540, 9)


def test_batch_shapes_and_shift(counting: TokenShards) -> None:
    inputs, targets = counting.batch(step=3, batch_size=4, seq_len=16)
    assert inputs.shape == targets.shape == (4, 16)
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(targets, inputs + 1)  # the counting data makes every next token +1
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_batch_is_deterministic_in_seed_and_step(counting: TokenShards) -> None:
    first = counting.batch(5, 8, 32, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, counting.batch(5, 8, 32, seed=1)))
    assert not torch.equal(first[0], counting.batch(6, 8, 32, seed=1)[0])
    assert not torch.equal(first[0], counting.batch(5, 8, 32, seed=2)[0])


def test_ranks_take_disjoint_rows_of_the_global_batch(counting: TokenShards) -> None:
    world = 3
    per_rank = [counting.batch(7, 2, 16, seed=4, rank=r, world_size=world) for r in range(world)]
    inputs_global, targets_global = counting.batch(7, 2 * world, 16, seed=4)
    assert torch.equal(torch.cat([inputs for inputs, _ in per_rank]), inputs_global)
    assert torch.equal(torch.cat([targets for _, targets in per_rank]), targets_global)
    starts = [int(row[0]) for inputs, _ in per_rank for row in inputs]
    assert len(set(starts)) == len(starts)  # different windows for different ranks
    with pytest.raises(ValueError):
        counting.batch(0, 2, 16, rank=3, world_size=3)


def test_pickles_as_a_reference_not_the_tokens(counting: TokenShards) -> None:
    data = pickle.dumps(counting)
    assert len(data) < 1000
    copy = pickle.loads(data)
    assert copy.num_tokens == counting.num_tokens and copy.window(1000, 50).tolist() == list(
        range(1000, 1050)
    )


def test_batch_edge_of_the_data(tmp_path: Path) -> None:
    write_shards(tmp_path, {"train": [np.arange(17)]})
    shards = TokenShards(tmp_path)
    inputs, targets = shards.batch(0, 3, 16)  # exactly seq_len + 1 tokens: only one window fits
    assert inputs[0].tolist() == list(range(16)) and targets[2].tolist() == list(range(1, 17))
    with pytest.raises(InputError) as error:
        shards.batch(0, 1, 17)
    message = str(error.value)
    assert "train" in message and "17 tokens" in message and "seq_len" in message


def test_iter_documents_across_shards(tmp_path: Path) -> None:
    stream = np.array([5, 6, 0, 7, 0, 0, 8, 9, 9, 0], dtype=np.uint16)
    write_shards(tmp_path, {"train": [stream[:4], stream[4:7], stream[7:]]}, dtype="uint16")
    documents = [d.tolist() for d in TokenShards(tmp_path).iter_documents()]
    assert documents == [[5, 6], [7], [], [8, 9, 9]]


def test_missing_folder_or_manifest(tmp_path: Path) -> None:
    for folder in (tmp_path / "nope", tmp_path):
        with pytest.raises(InputError) as error:
            TokenShards(folder)
        assert f"no token shards in {folder}: run `llmk prepare ... --out {folder}` first" == str(error.value)


def test_unknown_empty_and_truncated_splits(tmp_path: Path) -> None:
    write_shards(tmp_path, {"train": [np.arange(50)], "val": []})
    with pytest.raises(InputError, match="no 'test' split .*train, val"):
        TokenShards(tmp_path, "test")
    with pytest.raises(InputError, match="no token shards in the val split"):
        TokenShards(tmp_path, "val")
    with open(tmp_path / "train" / "shard_00000.bin", "r+b") as handle:
        handle.truncate(10)
    with pytest.raises(InputError, match="missing or not 200 bytes"):
        TokenShards(tmp_path)
    (tmp_path / "shards.json").write_text('{"format": "something-else"}')
    with pytest.raises(InputError, match="not an llmk-shards-v1 manifest"):
        TokenShards(tmp_path)
