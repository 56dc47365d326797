"""`llmk finetune` / `llmk evaluate` through the CLI on real data and real pretrained weights (small slices)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_llmk

pytestmark = pytest.mark.e2e


def test_sst2_minilm_then_evaluate_under_typo_attack(shared_data, tmp_path):
    out = tmp_path / "sst2"
    sst2 = shared_data / "sst2"
    result = run_llmk(
        "finetune",
        "classify",
        "--model",
        "all-minilm-l6-v2",
        "--data.train",
        str(sst2 / "train.tsv"),
        "--data.eval",
        str(sst2 / "dev.tsv"),
        "--data.limit",
        "800",
        "--epochs",
        "2",
        "--out",
        str(out),
        "--progress",
        "false",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "eval.json").read_text())
    assert report["accuracy"] > 0.75 and report["num_examples"] == 872
    evaluated = run_llmk(
        "evaluate",
        str(out),
        "--data",
        str(sst2 / "dev.tsv"),
        "--attack",
        "typo",
        "--out",
        str(tmp_path / "eval"),
    )
    assert evaluated.returncode == 0, evaluated.stderr
    document = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert document["accuracy"] == pytest.approx(report["accuracy"])
    assert document["attack"]["kind"] == "typo" and 0.5 < document["attack"]["accuracy"] <= 1


def test_wnut17_minilm_reports_every_entity_type(shared_data, tmp_path):
    wnut = shared_data / "wnut17_ner"
    out = tmp_path / "ner"
    result = run_llmk(
        "finetune",
        "ner",
        "--model",
        "all-minilm-l6-v2",
        "--data.train",
        str(wnut / "train.conll"),
        "--data.eval",
        str(wnut / "dev.conll"),
        "--data.limit",
        "600",
        "--epochs",
        "2",
        "--out",
        str(out),
        "--progress",
        "false",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "eval.json").read_text())
    assert report["num_sentences"] == 1009 and report["token_accuracy"] > 0.85
    config = json.loads((out / "config.json").read_text())
    types = {label.split("-", 1)[1] for label in config["id2label"].values() if label != "O"}
    assert types == {"person", "location", "group", "corporation", "product", "creative-work"}


def test_sft_lora_on_smollm2_merges_into_a_chat_model(tmp_path):
    pytest.importorskip("gguf")
    from llmkernel.models.loading import KNOWN_MODELS, smollm2_gguf

    try:
        smollm2_gguf()
    except Exception:
        pytest.skip(f"SmolLM2 is not installed ({KNOWN_MODELS['smollm2-135m-instruct']})")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "sft"
    data = tmp_path / "chat.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Say the magic word for {n}."},
                {"role": "assistant", "content": "Abracadabra!"},
            ]
        }
        for n in ("cats", "dogs", "owls", "bats", "frogs", "mice", "ants", "bees", "eels", "yaks")
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_llmk(
        "finetune",
        "sft",
        "--model",
        "smollm2-135m-instruct",
        "--method",
        "lora",
        "--merge",
        "--data.train",
        str(data),
        "--data.eval_fraction",
        "0.2",
        "--epochs",
        "4",
        "--optim.lr",
        "2e-3",
        "--train.batch_size",
        "4",
        "--train.log_every",
        "1",
        "--train.sample_tokens",
        "8",
        "--out",
        str(out),
        "--progress",
        "false",
    )
    assert result.returncode == 0, result.stderr
    losses = [
        json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x
    ]
    assert losses[-1] < losses[0]
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say the magic word for cows."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**ids, max_new_tokens=8, do_sample=False)
    reply = tokenizer.decode(output[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Abracadabra" in reply
