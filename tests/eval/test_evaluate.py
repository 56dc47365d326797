"""`llmk evaluate`: reproducible attacks, language-model metrics, and the stage contract (run.json, up to
date on an unchanged re-run, --force, inputs checked first)."""

from __future__ import annotations

import json

import pytest

from llmkernel.config import build
from llmkernel.errors import InputError
from llmkernel.eval.config import EvaluateConfig
from llmkernel.eval.evaluate import evaluate
from llmkernel.train.finetune import finetune
from tests.tiny_models import make_tiny_llama
from tests.train.test_finetune import _config


def test_evaluate_is_reproducible_and_hotflip_hurts(bert_dir, classify_files, tmp_path):
    train, dev = classify_files
    out = tmp_path / "tuned"
    finetune(_config(bert_dir, train, dev, out))
    documents = []
    for attack in ("typo", "typo", "hotflip"):
        config = build(
            EvaluateConfig,
            {
                "model": str(out),
                "data": dev,
                "attack": attack,
                "attack_rate": 0.5,
                "out": str(tmp_path / attack),
            },
        )
        documents.append(evaluate(config))
    typo, typo_again, flipped = documents
    assert typo["attack"]["accuracy"] == typo_again["attack"]["accuracy"]  # seeded
    assert flipped["attack"]["accuracy"] < flipped["accuracy"]
    assert json.loads((tmp_path / "hotflip" / "eval.json").read_text())["attack"]["kind"] == "hotflip"


def test_evaluate_lm_bits_per_byte(tmp_path):
    llama = make_tiny_llama(tmp_path / "llama")
    text = tmp_path / "text.txt"
    text.write_text("Hello world, the quick brown fox jumps over the lazy dog.\n" * 20)
    document = evaluate(
        build(EvaluateConfig, {"model": str(llama), "data": str(text), "out": str(tmp_path / "e")})
    )
    assert document["task"] == "lm" and 0 < document["bits_per_byte"] < 20
    assert document["perplexity"] == pytest.approx(2.718281828 ** document["loss"], rel=1e-6)
    with pytest.raises(InputError, match="--attack applies to classify and ner"):
        evaluate(build(EvaluateConfig, {"model": str(llama), "data": str(text), "attack": "typo"}))


def test_evaluate_writes_run_json_and_is_up_to_date_when_unchanged(tmp_path, capsys):
    llama = make_tiny_llama(tmp_path / "llama")
    text = tmp_path / "text.txt"
    text.write_text("Hello world, the quick brown fox jumps over the lazy dog.\n" * 20)
    config = {"model": str(llama), "data": str(text), "out": str(tmp_path / "e"), "progress": False}
    first = evaluate(build(EvaluateConfig, config))
    manifest = json.loads((tmp_path / "e" / "run.json").read_text())
    assert manifest["stage"] == "evaluate" and manifest["metrics"]["bits_per_byte"] == first["bits_per_byte"]
    assert {i["path"] for i in manifest["inputs"]} >= {str(text), str(llama / "model.safetensors")}
    assert [p["path"] for p in manifest["outputs"]] == ["eval.json"]
    capsys.readouterr()
    again = evaluate(build(EvaluateConfig, config))
    assert "up to date" in capsys.readouterr().out and again == first
    evaluate(build(EvaluateConfig, {**config, "force": True}))
    assert "up to date" not in capsys.readouterr().out
    assert not list(tmp_path.glob(".e.partial-*"))  # staged, then renamed into place


def test_a_missing_data_file_is_named_before_the_model(tmp_path):
    with pytest.raises(InputError, match="missing.csv: no such file"):
        evaluate(
            build(
                EvaluateConfig, {"model": str(tmp_path / "no-model"), "data": str(tmp_path / "missing.csv")}
            )
        )
