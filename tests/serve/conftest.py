"""Tiny random model folders for the server tests, and helpers to run an app in-process or on loopback.

The folders are real HF folders (config.json, safetensors, tokenizer files) small enough to build in well
under a second: a 2-layer Llama with a byte-level BPE tokenizer and a chat template, and 2-layer BERTs
(plain, sequence classification, token classification) with a small WordPiece vocabulary.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, LlamaConfig, PreTrainedTokenizerFast

from llmkernel.data.config import TokenizerConfig
from llmkernel.data.tokenizer import train_tokenizer
from llmkernel.serve.app import create_app
from llmkernel.serve.config import ServeConfig

CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "Alice lives in Paris and Bob works in Berlin.",
    "Call me at +44 20 7946 0958 or mail alice@example.com today.",
] * 20
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def make_tiny_llama(folder: Path) -> Path:
    """A 2-layer LlamaForCausalLM (width 32) with a 320-token byte-level BPE tokenizer."""
    from transformers import LlamaForCausalLM

    # the product's own byte-level BPE trainer: ChatML template, <|endoftext|> as eos
    tokenizer = train_tokenizer(CORPUS, TokenizerConfig(kind="bpe", vocab_size=320, min_frequency=1), folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)  # next to the tokenizer train_tokenizer saved
    return folder


def make_tiny_bert(folder: Path, head: str) -> Path:
    """A 2-layer BERT (width 32): head is "model" (BertModel), "classify" (2 labels) or "ner" (BIO tags)."""
    from transformers import BertForSequenceClassification, BertForTokenClassification, BertModel

    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    words = ["hello", "world", "alice", "bob", "lives", "works", "in", "paris", "berlin", "the", "call", "me"]
    vocab_list = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *words,
        *letters,
        *[f"##{c}" for c in letters],
    ]
    vocab_list += list(".,@+-!?")
    wordpiece = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab_list)}, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    wordpiece.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    labels = {"model": ["LABEL_0"], "classify": ["negative", "positive"], "ner": NER_LABELS}[head]
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab_list),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    model_class = {
        "model": BertModel,
        "classify": BertForSequenceClassification,
        "ner": BertForTokenClassification,
    }
    model_class[head](config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), "model")


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-classifier"), "classify")


@pytest.fixture(scope="session")
def ner_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-ner"), "ner")


def serve_config(model_dir: Path, **overrides: Any) -> ServeConfig:
    return ServeConfig(model=str(model_dir), **{"batch_window_ms": 2.0, "max_tokens": 32, **overrides})


def wait_ready(client: TestClient, headers: dict[str, str] | None = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get("/ready", headers=headers or {}).json().get("status")
        if status == "ready":
            return
        assert status != "failed", client.app.state.services.load_error
        time.sleep(0.02)
    raise TimeoutError("the model did not become ready")


@contextlib.contextmanager
def running_client(
    model_dir: Path, headers: dict[str, str] | None = None, **kwargs: Any
) -> Iterator[TestClient]:
    """An in-process client (lifespan run, model loaded and warm) for an app built by create_app."""
    config = kwargs.pop("config", None) or serve_config(model_dir, **kwargs.pop("options", {}))
    app = create_app(config, model_dir=model_dir, **kwargs)
    with TestClient(app) as client:
        wait_ready(client, headers)
        yield client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Run `app` under a real uvicorn on a free loopback port in a thread; yields the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
