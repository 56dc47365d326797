"""The training loop through `pretrain`: golden losses, equivalences, exact resume, outputs, bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from llmkernel.config import build
from llmkernel.errors import UserError
from llmkernel.train.checkpoint import list_checkpoints
from llmkernel.train.config import PretrainConfig
from llmkernel.train.pretrain import pretrain


def config(data, out, top: dict | None = None, model: dict | None = None, **train) -> PretrainConfig:
    """A validated config; `top` and `model` set top-level and model fields (configs are never changed
    after validation), the keywords set train fields."""
    train_fields = {
        "batch_size": 8,
        "seq_len": 32,
        "max_steps": 6,
        "eval_every": 0,
        "checkpoint_every": 0,
        "log_every": 1,
        "eval_batches": 2,
        "sample_tokens": 0,
        "threads": 1,
        **train,
    }
    return build(
        PretrainConfig,
        {
            "data": str(data),
            "out": str(out),
            "progress": False,
            "model": {"size": "tiny", **(model or {})},
            "train": train_fields,
            "optim": {"warmup_steps": 2, "lr": 3e-3},
            **(top or {}),
        },
    )


def train_losses(out) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in lines if record["split"] == "train"]


def test_golden_first_losses(bpe_data, tmp_path):
    pretrain(config(bpe_data, tmp_path / "run", max_steps=3))
    # fixed seed, tiny Llama (2 x 64), vocab 300: refactors must not change the math
    assert train_losses(tmp_path / "run") == pytest.approx([5.71846, 5.58185, 5.32899], abs=1e-3)


def test_accumulation_equals_one_big_batch(bpe_data, tmp_path):
    pretrain(config(bpe_data, tmp_path / "big", batch_size=8, grad_accum=1, max_steps=4))
    pretrain(config(bpe_data, tmp_path / "accum", batch_size=4, grad_accum=2, max_steps=4))
    assert train_losses(tmp_path / "accum") == pytest.approx(train_losses(tmp_path / "big"), abs=1e-5)


def test_resume_continues_exactly(bpe_data, tmp_path):
    full = tmp_path / "full"
    metrics = pretrain(config(bpe_data, full, max_steps=8, checkpoint_every=3, keep_checkpoints=10))
    # an interrupted run is one whose last checkpoint is step 3: drop what came after and resume
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step_000003", resumed / "checkpoints" / "step_000003")
    resume = config(bpe_data, resumed, {"resume": True}, max_steps=8, checkpoint_every=3, keep_checkpoints=10)
    resumed_metrics = pretrain(resume)
    assert resumed_metrics["train_loss"] == pytest.approx(metrics["train_loss"], abs=1e-6)
    assert resumed_metrics["val_loss"] == pytest.approx(metrics["val_loss"], abs=1e-6)
    assert train_losses(resumed) == pytest.approx(train_losses(full)[3:], abs=1e-6)
    assert [p.name for p in list_checkpoints(resumed)] == ["step_000003", "step_000006", "step_000008"]


def test_output_is_a_hugging_face_folder(bpe_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    metrics = pretrain(config(bpe_data, out, max_steps=2))
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "run.json",
        "metrics.jsonl",
    ):
        assert (out / name).is_file(), name
    assert (out / "tb").is_dir() and list_checkpoints(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and tokenizer.eos_token_id is not None
    assert {"val_loss", "val_perplexity", "val_bits_per_byte", "train_loss"} <= set(metrics)
    again = pretrain(config(bpe_data, out, max_steps=2))
    assert again == json.loads((out / "run.json").read_text())["metrics"]


def test_mlm_trains_an_encoder(wordpiece_data, tmp_path):
    from transformers import AutoModelForMaskedLM

    metrics = pretrain(config(wordpiece_data, tmp_path / "mlm", {"objective": "mlm"}, max_steps=30))
    losses = train_losses(tmp_path / "mlm")
    assert losses[-1] < losses[0]
    assert 0 <= metrics["val_masked_accuracy"] <= 1 and metrics["val_unigram_baseline_accuracy"] > 0
    assert AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm").config.model_type == "bert"


def test_bad_inputs_are_user_errors(bpe_data, tmp_path):
    with pytest.raises(UserError, match="no token shards|shards.json"):
        pretrain(config(tmp_path, tmp_path / "out"))
    with pytest.raises(UserError, match="larger than model.context_length"):
        pretrain(config(bpe_data, tmp_path / "out", model={"context_length": 16}))
    pretrain(config(bpe_data, tmp_path / "run", max_steps=2, checkpoint_every=1))
    (tmp_path / "run" / "run.json").unlink()
    with pytest.raises(UserError, match="--resume to continue"):
        pretrain(config(bpe_data, tmp_path / "run", max_steps=3))
    with pytest.raises(UserError, match="mlm needs a tokenizer with a \\[MASK\\]"):
        pretrain(config(bpe_data, tmp_path / "mlm", {"objective": "mlm"}))
