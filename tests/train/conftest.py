"""Small prepared data folders for training tests (built once per session with the real `prepare`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmkernel.config import build
from llmkernel.data.config import PrepareConfig
from llmkernel.data.pipeline import prepare
from tests.tiny_models import make_tiny_bert, make_tiny_llama

WORDS = (
    "the a river ran past old mill where miller kept books and counted grain each evening while his daughter "
    "read letters sent by cousin who travelled far beyond hills to seek work in growing towns of north"
).split()


def _corpus(folder, documents: int = 60, words: int = 300) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir()
    for index in range(documents):
        sentences = [" ".join(rng.choice(WORDS, size=10)).capitalize() + "." for _ in range(words // 10)]
        (folder / f"doc{index:03d}.txt").write_text(" ".join(sentences))


def _prepare(root, kind: str):
    _corpus(root / "corpus")
    config = build(
        PrepareConfig,
        {
            "inputs": [str(root / "corpus")],
            "out": str(root / "data"),
            "workers": 1,
            "progress": False,
            "dedup": {"near": False},
            "filter": {"enabled": False},
            "tokenizer": {"kind": kind, "vocab_size": 300},
            "pack": {"val_fraction": 0.1},
        },
    )
    prepare(config)
    return root / "data"


@pytest.fixture(scope="session")
def bpe_data(tmp_path_factory):
    return _prepare(tmp_path_factory.mktemp("bpe"), "bpe")


@pytest.fixture(scope="session")
def wordpiece_data(tmp_path_factory):
    return _prepare(tmp_path_factory.mktemp("wordpiece"), "wordpiece")


# ----------------------------------------------------------------------------- tiny fine-tuning models


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on busy shared cores they spin (100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def bert_folder(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert_classify"), "classify")


@pytest.fixture(scope="session")
def ner_folder(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert_ner"), "ner")


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("llama"))
