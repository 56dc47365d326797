"""`seq2seq` (encoder-decoder translation) and `sft` on pair files: encoding, the loss against HF's own,
BLEU/chrF against sacreBLEU, the tokenizer's language check, bad input through the CLI, and whole runs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import sacrebleu
import torch

from llmkernel.errors import ConfigError
from llmkernel.io.pairs import read_pairs, unknown_rate
from llmkernel.io.tokenizers import load_tokenizer
from llmkernel.models.loading import architecture_kind, load_config, load_model, preset_folder
from llmkernel.tasks.base import IGNORE
from llmkernel.tasks.metrics import translation_scores
from llmkernel.tasks.seq2seq import Seq2Seq
from llmkernel.train.config import FinetuneDataConfig
from tests.conftest import run_llmk
from tests.serve.conftest import running_client
from tests.test_cli import _exit_code
from tests.translation_data import TRAIN_FLAGS, make_translation_set, write_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def translation_set(tmp_path_factory):
    """The tiny zh->en set, with presets built into a cache of its own (LLMK_CACHE, also for subprocesses)."""
    root = tmp_path_factory.mktemp("translation")
    before = os.environ.get("LLMK_CACHE")
    os.environ["LLMK_CACHE"] = str(root / "cache")
    yield make_translation_set(root)
    if before is None:
        os.environ.pop("LLMK_CACHE", None)
    else:
        os.environ["LLMK_CACHE"] = before


exit_code = _exit_code  # `llmk ARGV` in this process: (exit code, stderr)


def test_encoder_decoder_architectures_are_the_seq2seq_kind():
    for name in ("MarianMTModel", "BartForConditionalGeneration", "T5ForConditionalGeneration"):
        assert architecture_kind(name) == "seq2seq"
    assert architecture_kind("LlamaForCausalLM") == "decoder"


def test_the_teacher_forced_loss_is_hf_s_own_shift_and_cross_entropy(translation_set):
    """Without smoothing, our summed loss over the counted tokens equals the HF model's mean loss given
    `labels` (which shifts them right itself): the decoder inputs start with decoder_start and drop eos."""
    folder = preset_folder("seq2seq-tiny", translation_set["tokenizer"], seed=0)
    model = load_model(folder, "seq2seq").eval()
    tokenizer = load_tokenizer(folder)
    task = Seq2Seq(
        tokenizer, 32, 4, label_smoothing=0.0, decoder_start_id=model.config.decoder_start_token_id
    )
    examples = task.encode(read_pairs(translation_set["train"], limit=4))
    batch = task.collate(examples)
    assert all(e["input_ids"][-1] == task.eos_id and e["labels"][-1] == task.eos_id for e in examples)
    assert (batch["decoder_input_ids"][:, 0] == model.config.decoder_start_token_id).all()
    assert task.count(batch) == sum(len(e["labels"]) for e in examples)
    with torch.no_grad():
        ours = task.loss(model, batch) / task.count(batch)
        theirs = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    smoothed = Seq2Seq(tokenizer, 32, 4, label_smoothing=0.1, decoder_start_id=task.decoder_start_id)
    with torch.no_grad():
        assert smoothed.loss(model, batch).item() != pytest.approx(ours.item() * task.count(batch))
    assert (batch["labels"] == IGNORE).any()  # rows of different lengths: padding is ignored


def test_seq2seq_batches_are_random_unless_length_grouping_is_asked_for(translation_set):
    """seq2seq's default is random batches (length-grouped ones slow a from-scratch model down); the
    --data.group_by_length setting turns grouping on, and anything but auto/true/false is refused."""
    folder = preset_folder("seq2seq-tiny", translation_set["tokenizer"], seed=0)
    data = FinetuneDataConfig(train=str(translation_set["train"]), eval=str(translation_set["dev"]))
    task = Seq2Seq.from_training_files(load_tokenizer(folder), load_config(folder), data, 0, 4, 32)
    assert not task.batches.group_by_length
    task.use_length_grouping("auto")
    assert not task.batches.group_by_length
    task.use_length_grouping("true")
    assert task.batches.group_by_length and task.batches.per_epoch == -(-len(task.train) // 4)
    with pytest.raises(ConfigError, match="group_by_length"):
        FinetuneDataConfig(group_by_length="sometimes")


def test_bleu_and_chrf_are_sacrebleu_s_corpus_scores():
    hypotheses = ["The cat sat on the mat.", "It is raining today", "Hello there"]
    references = ["The cat is on the mat.", "It's raining today.", "Hello there!"]
    scores = translation_scores(hypotheses, references)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [references]).score)
    assert "tok:13a" in scores["bleu_signature"]
    assert "tok:zh" in translation_scores(["我很好。"], ["我很好！"])["bleu_signature"]  # en->zh


def test_a_tokenizer_without_the_language_has_a_high_unknown_rate(translation_set):
    sources = read_pairs(translation_set["train"], limit=200).sources
    assert unknown_rate(load_tokenizer(translation_set["tokenizer"]), sources) < 0.05
    assert unknown_rate(load_tokenizer(translation_set["en_tokenizer"]), sources) > 0.9


def test_pairs_detect_their_columns_or_take_named_ones(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("english,chinese\nHi.,你好。\n", encoding="utf-8")
    pairs = read_pairs(path, source_column="chinese", target_column="english")
    assert (pairs.sources, pairs.targets) == (["你好。"], ["Hi."])


# ------------------------------------------------------------------------------- bad input, one line, exit 2


def finetune_args(set_: dict, train: Path, out: Path, tokenizer: str = "tokenizer") -> list[str]:
    return ["finetune", "seq2seq", "--model", "seq2seq-tiny", "--tokenizer", str(set_[tokenizer]),
            "--data.train", str(train), "--data.eval", str(set_["dev"]), "--out", str(out), *TRAIN_FLAGS]  # fmt: skip


def test_an_empty_source_line_is_one_line_and_exit_2(translation_set, tmp_path, capsys):
    train = write_pairs(tmp_path / "train.tsv", [("一。", "One."), ("  ", "Two."), ("三。", "Three.")])
    code, err = exit_code(finetune_args(translation_set, train, tmp_path / "out"), capsys)
    assert code == 2 and err.count("\n") == 1
    assert "train.tsv row 2 (line 3): empty 'src'" in err
    assert not (tmp_path / "out").exists()


def test_a_row_without_a_tab_is_one_line_and_exit_2(translation_set, tmp_path, capsys):
    train = tmp_path / "train.tsv"
    train.write_text("src\ttgt\n一。\tOne.\n二。 Two.\n", encoding="utf-8")
    code, err = exit_code(finetune_args(translation_set, train, tmp_path / "out"), capsys)
    assert code == 2 and err.count("\n") == 1
    assert "train.tsv line 3: 1 fields, the header has 2" in err


def test_a_tokenizer_that_lacks_the_source_language_is_refused(translation_set, tmp_path, capsys):
    args = finetune_args(translation_set, translation_set["train"], tmp_path / "out", "en_tokenizer")
    code, err = exit_code(args, capsys)
    assert code == 2 and err.count("\n") == 1
    assert "(src): 100% of the tokens are unknown or byte fallbacks" in err and "llmk prepare" in err
    assert not (tmp_path / "out").exists()


def test_a_preset_needs_a_tokenizer(translation_set, tmp_path, capsys):
    args = ["finetune", "seq2seq", "--model", "seq2seq-tiny", "--data.train", str(translation_set["train"])]
    code, err = exit_code([*args, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "is a preset trained from scratch: pass --tokenizer DIR" in err


def test_a_decoder_is_refused_by_seq2seq(translation_set, tmp_path, capsys):
    args = finetune_args(translation_set, translation_set["train"], tmp_path / "out")
    args[args.index("seq2seq-tiny")] = "decoder-tiny"
    code, err = exit_code(args, capsys)
    assert code == 2 and "is a decoder model; seq2seq trains encoder-decoders" in err


# ------------------------------------------------------------------------------------------ whole runs


@pytest.mark.e2e
def test_seq2seq_learns_the_tiny_set_evaluate_reports_bleu_and_serve_translates(translation_set, tmp_path):
    out = tmp_path / "seq2seq"
    result = run_llmk(*finetune_args(translation_set, translation_set["train"], out))
    assert result.returncode == 0, result.stderr
    assert (out / "config.json").is_file() and (out / "run.json").is_file()
    metrics = json.loads((out / "run.json").read_text())["metrics"]
    assert metrics["eval_bleu"] > 60 and metrics["eval_chrf"] > 70  # greedy dev BLEU ~100 when learned
    result = run_llmk(
        "evaluate", str(out), "--data", str(translation_set["dev"]), "--out", str(tmp_path / "eval")
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["task"] == "seq2seq" and report["num_beams"] == 4 and report["sentences"] == 50
    assert report["bleu"] > 60 and "tok:13a" in report["bleu_signature"]
    assert "translation:" in result.stdout and report["samples"][0]["reply"]
    with running_client(out, options={"num_beams": 2}) as client:  # the real app, /v1/completions
        answer = client.post(
            "/v1/completions", json={"prompt": ["三五七。", "九。"], "max_tokens": 12}
        ).json()
    assert [c["text"] for c in answer["choices"]] == ["Three five seven.", "Nine."]
    assert all(c["finish_reason"] == "stop" for c in answer["choices"])


@pytest.mark.e2e
def test_sft_of_a_decoder_preset_on_the_same_pairs_reports_bleu(translation_set, tmp_path):
    """The other approach on the same tsv: a decoder from scratch, the source as the user turn."""
    out = tmp_path / "sft"
    args = ["finetune", "sft", "--model", "decoder-tiny", "--tokenizer", str(translation_set["tokenizer"])]
    args += ["--data.train", str(translation_set["train"]), "--data.eval", str(translation_set["dev"])]
    args += ["--data.prompt_template", "Translate: {source}", "--out", str(out), "--train.max_steps", "40"]
    args += ["--train.sample_tokens", "12"]
    result = run_llmk(*args, "--train.threads", "1", "--progress", "false")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "run.json").read_text())["metrics"]
    assert "eval_bleu" in metrics and "eval_chrf" in metrics and metrics["eval_loss"] > 0
    result = run_llmk("evaluate", str(out), "--data", str(translation_set["dev"]), "--out", str(tmp_path / "eval"),
                      "--prompt_template", "Translate: {source}", "--limit", "10", "--sample_tokens", "12")  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["task"] == "sft" and {"bleu", "chrf", "loss"} <= set(report)


@pytest.mark.e2e
def test_real_tatoeba_prepare_train_and_evaluate(shared_data, tmp_path):
    """The recipe's tokenizer on the real train.tsv, a short seq2seq-tiny run, test BLEU/chrF on 100 pairs."""
    data = shared_data / "tatoeba_zh_en"
    if not (data / "train.tsv").is_file():
        pytest.skip(f"{data} is absent")
    result = run_llmk("prepare", "--config", "recipes/tatoeba-translation.yaml", "--out", str(tmp_path / "data"),
                      "--workers", "1", "--progress", "false")  # fmt: skip
    assert result.returncode == 0, result.stderr
    tokenizer = tmp_path / "data" / "tokenizer"
    sources = read_pairs(data / "test.tsv", limit=500).sources
    # Chinese is covered by the shared BPE: only characters train.tsv never has fall back to bytes
    assert unknown_rate(load_tokenizer(tokenizer), sources) < 0.1
    out = tmp_path / "model"
    args = [
        "finetune",
        "seq2seq",
        "--model",
        "seq2seq-tiny",
        "--tokenizer",
        str(tokenizer),
        "--out",
        str(out),
    ]
    args += [
        "--data.train",
        str(data / "train.tsv"),
        "--data.eval",
        str(data / "dev.tsv"),
        "--data.limit",
        "3000",
    ]
    result = run_llmk(*args, "--train.max_steps", "40", "--train.threads", "1", "--progress", "false")
    assert result.returncode == 0, result.stderr
    result = run_llmk("evaluate", str(out), "--data", str(data / "test.tsv"), "--limit", "100",
                      "--num_beams", "2", "--out", str(tmp_path / "eval"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["sentences"] == 100 and 0 <= report["bleu"] <= 100 and 0 <= report["chrf"] <= 100
    assert (
        len(report["samples"]) == 5
        and report["samples"][0]["prompt"] == read_pairs(data / "test.tsv", limit=1).sources[0]
    )


def test_stub_tokenizer_without_eos_is_refused():
    tokenizer = SimpleNamespace(eos_token_id=None, sep_token_id=None, pad_token_id=0, name_or_path="t")
    with pytest.raises(Exception, match="no eos token"):
        Seq2Seq(tokenizer, 8, 2)
