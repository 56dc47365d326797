"""The embed task: InfoNCE with in-batch negatives, masking of other relevant documents, hard negatives,
pair files, and `llmk finetune embed` on a tiny BERT and a tiny BEIR folder."""

from __future__ import annotations

import json
import signal

import pytest
import torch
import torch.nn.functional as F

from llmkernel.cli import main
from llmkernel.config import build
from llmkernel.models.loading import load_model, load_tokenizer_for
from llmkernel.retrieval.build import build_index
from llmkernel.retrieval.config import IndexConfig
from llmkernel.tasks.embed import ContrastiveEmbed, mean_pool
from llmkernel.train.config import FinetuneConfig
from llmkernel.train.finetune import finetune
from tests.retrieval.tiny_beir import make_tiny_beir
from tests.tiny_models import make_tiny_bert


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    return make_tiny_beir(tmp_path_factory.mktemp("beir") / "tiny")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("encoder"), "model")


def _task(encoder, beir, **data) -> ContrastiveEmbed:
    config = build(
        FinetuneConfig, {"task": "embed", "model": str(encoder), "data": {"train": str(beir), **data}}
    )
    model_config = load_model(encoder, "encoder").config
    return ContrastiveEmbed.from_training_files(
        load_tokenizer_for(encoder), model_config, config.data, 0, 4, 0
    )


def test_loss_is_scaled_infonce_over_the_batch(encoder, beir, one_thread):
    task = _task(encoder, beir)
    model = load_model(encoder, "encoder")
    batch = task.collate(task.train[:4])
    assert batch["input_ids"].shape[0] == batch["query_input_ids"].shape[0] == 4
    queries = mean_pool(
        model(batch["query_input_ids"], batch["query_attention_mask"]).last_hidden_state,
        batch["query_attention_mask"],
    )
    documents = mean_pool(
        model(batch["input_ids"], batch["attention_mask"]).last_hidden_state, batch["attention_mask"]
    )
    expected = F.cross_entropy(20.0 * queries @ documents.T, torch.arange(4), reduction="sum")
    assert task.loss(model, batch).item() == pytest.approx(expected.item(), rel=1e-5)
    task.symmetric = True
    backward = F.cross_entropy(20.0 * documents @ queries.T, torch.arange(4), reduction="sum")
    assert task.loss(model, batch).item() == pytest.approx((expected + backward).item() / 2, rel=1e-5)


def test_a_document_relevant_to_the_query_is_no_negative(encoder, beir):
    task = _task(encoder, beir)
    first = task.train[0]
    # the same query with another relevant document, and another query whose document is first's
    other = {**task.train[1], "query_key": first["query_key"]}
    task.positives[first["query_key"]] = {first["document_key"], other["document_key"]}
    batch = task.collate([first, other, task.train[2]])
    assert batch["relevant"].tolist() == [[False, True, False], [True, False, False], [False, False, False]]


def test_hard_negatives_are_mined_from_the_corpus_and_never_relevant(encoder, beir, one_thread):
    task = _task(encoder, beir, hard_negatives=2)
    model = load_model(encoder, "encoder")
    assert task.wrap(model) is model and task.mined
    for example in task.train:
        assert len(example["negative_keys"]) == 2
        assert not set(example["negative_keys"]) & task.positives[example["query_key"]]
    batch = task.collate(task.train[:3])
    assert batch["input_ids"].shape[0] == 3 + 6 and batch["relevant"].shape == (3, 9)
    assert torch.isfinite(task.loss(model, batch))


def test_pair_files_train_and_hold_out_pairs(encoder, tmp_path, one_thread):
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"query": f"paris {w}", "positive": f"paris lives {w} {w}"}
        for w in ("kax", "kay", "kav", "kex", "key")
    ]
    rows += [
        {"query": f"berlin {w}", "positive": f"berlin works {w}", "negative": "the me"}
        for w in ("kox", "koy")
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = build(
        FinetuneConfig,
        {
            "task": "embed",
            "model": str(encoder),
            "out": str(tmp_path / "out"),
            "progress": False,
            "data": {"train": str(pairs), "eval_fraction": 0.3},
            "train": {"max_steps": 2, "batch_size": 4},
        },
    )
    metrics = finetune(config)
    assert metrics["eval_queries"] == 2 and metrics["eval_documents"] == 8  # 7 positives and the negative
    assert 0 <= metrics["eval_ndcg_at_10"] <= 1


def test_finetune_embed_through_the_cli(encoder, beir, tmp_path, capsys, one_thread):
    out = tmp_path / "tuned"
    args = ["finetune", "embed", "--model", str(encoder), "--data.train", str(beir), "--data.eval", str(beir)]
    args += [
        "--out",
        str(out),
        "--train.max_steps",
        "12",
        "--train.batch_size",
        "6",
        "--optim.lr",
        "1e-3",
        "--patience",
        "0",
    ]
    args += ["--train.log_every", "3"]
    handler = signal.getsignal(signal.SIGTERM)  # main installs its own
    try:
        assert main([*args, "--progress", "false"]) == 0
    finally:
        signal.signal(signal.SIGTERM, handler)
    printed = capsys.readouterr().out
    assert "4 epochs of 18 pairs" in printed and "6 evaluation examples" in printed
    report = json.loads((out / "eval.json").read_text())
    assert report["task"] == "embed" and report["queries"] == 6 and report["documents"] == 24
    losses = [
        json.loads(line)["loss"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"train"' in line
    ]
    assert losses[-1] < losses[0]  # 12 steps on 18 pairs: the in-batch loss falls
    assert load_model(out, "encoder").config.architectures == ["BertModel"]  # a plain encoder folder
    meta = build_index(
        IndexConfig(encoder=str(out), corpus=str(beir), out=str(tmp_path / "index"), progress=False)
    )
    assert meta["documents"] == 24 and meta["encoder"] == str(out.resolve())
