"""`llmk finetune` on tiny random models: outputs, methods, resume, label names, errors."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from llmkernel.config import build
from llmkernel.errors import UserError
from llmkernel.eval.config import EvaluateConfig
from llmkernel.eval.evaluate import evaluate
from llmkernel.train.config import FinetuneConfig
from llmkernel.train.finetune import BestModel, finetune
from tests.conftest import fails_in_one_line, run_llmk
from tests.tiny_models import make_tiny_bert, make_tiny_llama

CITIES = ["paris", "berlin"]
FILLER = ["hello", "world", "the", "alice", "bob", "lives", "works", "in", "me"]


def _sentence(rng: random.Random, city: str | None) -> str:
    words = rng.choices(FILLER, k=rng.randint(2, 8))
    if city:
        words.insert(rng.randrange(len(words) + 1), city)
    return " ".join(words)


def _classify_rows(count: int, seed: int) -> list[tuple[str, str]]:
    """Three string labels, each given away by one word: paris -> france, berlin -> germany, call -> phone."""
    rng = random.Random(seed)
    labels = {"paris": "france", "berlin": "germany", "call": "phone"}
    rows = []
    for _ in range(count):
        keyword = rng.choice(list(labels))
        rows.append((_sentence(rng, keyword), labels[keyword]))
    return rows


def _write_tsv(path, rows) -> str:
    path.write_text("sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows))
    return str(path)


def _write_conll(path, count: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        words = _sentence(rng, rng.choice(CITIES)).split()
        for word in words:
            tag = "B-LOC" if word in CITIES else "B-PER" if word in ("alice", "bob") else "O"
            lines.append(f"{word}\t{tag}")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert"), "model")


@pytest.fixture(scope="module")
def classify_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    return _write_tsv(root / "train.tsv", _classify_rows(240, 0)), _write_tsv(
        root / "dev.tsv", _classify_rows(60, 1)
    )


def _config(bert_dir, train_file, dev_file, out, **overrides) -> FinetuneConfig:
    data = {
        "task": "classify",
        "model": str(bert_dir),
        "out": str(out),
        "epochs": 4,
        "data": {"train": train_file, "eval": dev_file},
        "train": {"batch_size": 16, "threads": 1},
        "optim": {"lr": 1e-2},
        "progress": False,
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    return build(FinetuneConfig, data)


@pytest.mark.e2e
def test_classify_through_the_cli_then_evaluate_with_an_attack(bert_dir, classify_files, tmp_path):
    train, dev = classify_files
    out = tmp_path / "tuned"
    args = ["finetune", "classify", "--model", str(bert_dir), "--data.train", train, "--data.eval", dev]
    args += [
        "--epochs",
        "6",
        "--patience",
        "0",
        "--optim.lr",
        "1e-2",
        "--out",
        str(out),
        "--progress",
        "false",
    ]
    result = run_llmk(*args)
    assert result.returncode == 0, result.stderr
    assert "settings:" in result.stdout and "accuracy" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert sorted(config["id2label"].values()) == ["france", "germany", "phone"]
    report = json.loads((out / "eval.json").read_text())
    assert report["accuracy"] > 0.9  # one word decides the label
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "run.json").read_text())["metrics"]["best_accuracy"] == report["accuracy"]
    assert not (out / "best").exists()

    again = run_llmk(*args)
    assert again.returncode == 0 and "up to date" in again.stdout

    evaluated = run_llmk("evaluate", str(out), "--data", dev, "--attack", "typo", "--attack-rate", "0.5")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "attacked" in evaluated.stdout


@pytest.mark.parametrize("method", ["top_layers", "lora"])
def test_methods_train_a_share_of_the_parameters(bert_dir, classify_files, tmp_path, method):
    train, dev = classify_files
    out = tmp_path / method
    metrics = finetune(_config(bert_dir, train, dev, out, method=method, top_layers=1))
    assert metrics["trainable_parameters"] < metrics["parameters"]
    assert metrics["eval_accuracy"] > 0.5
    if method == "lora":
        assert (out / "adapter_config.json").is_file()
        document = evaluate(
            build(EvaluateConfig, {"model": str(out), "data": dev, "out": str(tmp_path / "e")})
        )
        assert document["accuracy"] == pytest.approx(metrics["eval_accuracy"])


def test_lora_merge_writes_a_plain_folder(bert_dir, classify_files, tmp_path):
    from transformers import AutoModelForSequenceClassification

    train, dev = classify_files
    out = tmp_path / "merged"
    metrics = finetune(_config(bert_dir, train, dev, out, method="lora", merge=True))
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())
    document = evaluate(build(EvaluateConfig, {"model": str(out), "data": dev, "out": str(tmp_path / "e")}))
    assert document["accuracy"] == pytest.approx(metrics["eval_accuracy"])


@pytest.mark.parametrize("method", ["fgm", "pgd", "freelb"])
def test_adversarial_training_learns(bert_dir, classify_files, tmp_path, method):
    train, dev = classify_files
    adversarial = {"method": method}  # the default size: 5% of each sequence's embedding norm
    metrics = finetune(
        _config(
            bert_dir, train, dev, tmp_path / method, adversarial=adversarial, epochs=6, optim={"lr": 1e-2}
        )
    )
    assert metrics["eval_accuracy"] > 0.5


def test_resume_continues_exactly(bert_dir, classify_files, tmp_path):
    train, dev = classify_files
    whole = tmp_path / "whole"
    finetune(_config(bert_dir, train, dev, whole, train={"checkpoint_every": 10, "log_every": 1}, epochs=2))
    resumed = tmp_path / "resumed"
    finetune(_config(bert_dir, train, dev, resumed, train={"checkpoint_every": 10, "log_every": 1}, epochs=2))
    # make it look like a run killed after its first kept checkpoint: drop what came later
    first, *later = sorted((resumed / "checkpoints").iterdir())
    for late in later:
        shutil.rmtree(late)
    (resumed / "run.json").unlink()
    kept = int(first.name.removeprefix("step_"))
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= kept))
    finetune(
        _config(
            bert_dir,
            train,
            dev,
            resumed,
            train={"checkpoint_every": 10, "log_every": 1},
            epochs=2,
            resume=True,
        )
    )

    def losses(folder):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}

    assert losses(resumed) == pytest.approx(losses(whole), rel=1e-5)


def test_best_model_keeps_the_best_and_stops_after_patience(tmp_path):
    from llmkernel.dist import init

    model = torch.nn.Linear(2, 2)
    best = BestModel(tmp_path / "best", "accuracy", False, 2, model, init())
    assert not best(1, {"accuracy": 0.5})
    saved = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not best(2, {"accuracy": 0.4})
    assert best(3, {"accuracy": 0.45})  # two evaluations without improvement
    best.restore(model)
    assert torch.equal(model.weight, saved) and best.best_step == 1


def test_ner_reports_entity_f1(tmp_path):
    bert = make_tiny_bert(tmp_path / "bert", "model")
    train = _write_conll(tmp_path / "train.conll", 200, 0)
    dev = _write_conll(tmp_path / "dev.conll", 40, 1)
    out = tmp_path / "ner"
    config = build(
        FinetuneConfig,
        {
            "task": "ner",
            "model": str(bert),
            "out": str(out),
            "epochs": 4,
            "data": {"train": train, "eval": dev},
            "train": {"batch_size": 16, "threads": 1},
            "optim": {"lr": 3e-3},
            "progress": False,
        },
    )
    metrics = finetune(config)
    report = json.loads((out / "eval.json").read_text())
    assert set(report["per_type"]) == {"LOC", "PER"}
    assert metrics["eval_f1"] == report["f1"] > 0.8
    document = evaluate(build(EvaluateConfig, {"model": str(out), "data": dev, "out": str(tmp_path / "e")}))
    assert document["f1"] == pytest.approx(report["f1"])
    for attack in ("swap", "hotflip"):
        config = {
            "model": str(out),
            "data": dev,
            "attack": attack,
            "attack_rate": 0.3,
            "out": str(tmp_path / attack),
        }
        attacked = evaluate(build(EvaluateConfig, config))
        assert attacked["f1"] == pytest.approx(report["f1"]) and attacked["attack"]["f1"] <= report["f1"]


def test_sft_lora_learns_the_replies_and_merges(tmp_path):
    from transformers import AutoModelForCausalLM

    llama = make_tiny_llama(tmp_path / "llama")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Hello {name}"},
                {"role": "assistant", "content": "Hello world"},
            ]
        }
        for name in ("alice", "bob", "the fox", "dog", "Paris", "Berlin") * 4
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sft"
    config = build(
        FinetuneConfig,
        {
            "task": "sft",
            "model": str(llama),
            "out": str(out),
            "method": "lora",
            "merge": True,
            "epochs": 20,
            "patience": 0,
            "data": {"train": str(data)},
            "train": {"batch_size": 4, "threads": 1, "log_every": 1, "sample_tokens": 8},
            "optim": {"lr": 3e-2},
            "progress": False,
        },
    )
    finetune(config)
    losses = [
        json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x
    ]
    # LoRA cannot sharpen this random tiny model's frozen, tied 0.02-scale output embeddings far (full
    # fine-tuning reaches ~0.03 here), but the loss must clearly fall
    assert losses[-1] < losses[0] - 0.4
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.architectures == ["LlamaForCausalLM"]
    report = json.loads((out / "eval.json").read_text())
    assert report["samples"] and "reply" in report["samples"][0]


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.e2e
def test_bad_input_is_one_line_and_exit_2(bert_dir, classify_files, tmp_path):
    train, dev = classify_files
    base = ["finetune", "classify", "--model", str(bert_dir), "--out", str(tmp_path / "out")]
    assert "labl" in fails_in_one_line(*base, "--data.train", train, "--data.label_column", "labl")
    unseen = tmp_path / "unseen.tsv"
    _write_tsv(unseen, [("hello paris", "france"), ("hello rome", "italy")])
    assert "italy" in fails_in_one_line(*base, "--data.train", train, "--data.eval", str(unseen))
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    assert "empty.tsv" in fails_in_one_line(*base, "--data.train", str(empty))
    conll = tmp_path / "bad.conll"
    conll.write_text("hello\tO\nparis\tB-LOC\textra\n")
    message = fails_in_one_line("finetune", "ner", "--model", str(bert_dir), "--data.train", str(conll))
    assert "line 2" in message
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    assert "not a model folder" in fails_in_one_line(
        "finetune", "classify", "--model", str(not_a_model), "--data.train", train
    )
    (not_a_model / "config.json").write_text("{}")
    assert "not-a-model" in fails_in_one_line(
        "finetune", "classify", "--model", str(not_a_model), "--data.train", train
    )
    assert not (tmp_path / "out").exists()


def test_label_names_name_integer_labels(bert_dir, tmp_path):
    rows = [(text, "1" if label == "france" else "0") for text, label in _classify_rows(80, 3)]
    train = _write_tsv(tmp_path / "train.tsv", rows)
    out = tmp_path / "named"
    finetune(_config(bert_dir, train, "", out, epochs=1, data={"label_names": ["negative", "positive"]}))
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    with pytest.raises(UserError, match="data.label_names: 3 names for 2 labels"):
        finetune(_config(bert_dir, train, "", tmp_path / "x", data={"label_names": ["a", "b", "c"]}))
