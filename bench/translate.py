"""Benchmark `llmk finetune seq2seq` against a plain Hugging Face Seq2SeqTrainer on Tatoeba zh->en.

Both sides train the same preset (seq2seq-small: a Marian-style encoder-decoder, built from the same
seed on the same tokenizer) on the same 26,055 training pairs, encoded the same way (source and target
each ended by eos, at most 32 tokens), for the same wall-clock budget (--minutes each) and the same step
schedule: batch 64, learning rate 1e-3 with 6% warmup and linear decay over --epochs epochs of steps (the
budget may stop either side before the end), weight decay 0.01,
label smoothing 0.1, gradient clipping at 1, fp32 on CPU, random batches on both sides (seq2seq's default;
length-grouped batches slow this from-scratch model down). The Trainer is plain: its own
DataCollatorForSeq2Seq padding, no evaluation; ours evaluates greedily on dev every epoch (inside its
budget) and keeps the best. Both folders are then scored by the same command, `llmk evaluate` on test.tsv
(beam 4, sacreBLEU 13a BLEU and chrF). Pairs/s count optimizer steps only on our side (the loop's clock) and
the Trainer's steps (its clock, without its start-up); tokens/s are pairs/s times the mean tokens of a
pair (source + target). Each side runs in its own process; with --rounds N the sides alternate N times.

Prints one JSON line: bleu, chrf, hf_trainer_bleu, hf_trainer_chrf, bleu_vs_hf_trainer, pairs_per_s,
tokens_per_s, hf_trainer_pairs_per_s, hf_trainer_tokens_per_s, steps, hf_trainer_steps, minutes, ...
Usage: python bench/translate.py [--minutes 20] [--rounds 1] [--threads 0] [--test-limit 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "tatoeba_zh_en"
RECIPE = REPO / "recipes" / "tatoeba-translation.yaml"
PRESET, BATCH, LR, WARMUP, SMOOTHING = "seq2seq-small", 64, 1e-3, 0.06, 0.1
MAX_LENGTH = 32  # tokens per side: more than 99.5% of the pairs fit (longer ones are cut, eos kept)
TRAIN_PAIRS = 26_055
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def llmk(*args: str) -> None:
    command = [sys.executable, "-m", "llmkernel.cli", *args]
    result = subprocess.run(command, env=ENV, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"llmk {args[0]} failed: {(result.stderr or result.stdout)[-2000:]}")


def prepare_tokenizer(root: Path) -> Path:
    """The recipe's tokenizer (a byte-level BPE on both sides of train.tsv), prepared once into `root`."""
    llmk("prepare", "--config", str(RECIPE), "--out", str(root / "data"), "--progress", "false")
    return root / "data" / "tokenizer"


def ours(tokenizer: Path, out: Path, minutes: float, threads: int, max_steps: int) -> dict:
    args = ["finetune", "seq2seq", "--model", PRESET, "--tokenizer", str(tokenizer), "--out", str(out)]
    args += ["--data.train", str(DATA / "train.tsv"), "--data.eval", str(DATA / "dev.tsv")]
    args += ["--train.batch_size", str(BATCH), "--optim.lr", str(LR), "--train.max_steps", str(max_steps)]
    args += ["--train.seq_len", str(MAX_LENGTH)]
    args += ["--data.label_smoothing", str(SMOOTHING), "--train.time_limit_minutes", str(minutes)]
    args += ["--train.threads", str(threads), "--patience", "0", "--progress", "false"]
    llmk(*args)
    metrics = json.loads((out / "run.json").read_text())["metrics"]
    return {"pairs_per_s": metrics["train_samples_per_s"], "steps": metrics["step"]}


def hf_trainer(tokenizer_dir: Path, out: Path, minutes: float, threads: int, max_steps: int) -> dict:
    """The Trainer side, run in this (child) process: trains, saves an HF folder into `out`."""
    import torch
    from transformers import (
        AutoModelForSeq2SeqLM,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        TrainerCallback,
    )

    from llmkernel.io.pairs import read_pairs
    from llmkernel.models.loading import load_tokenizer_for, preset_folder

    if threads:
        torch.set_num_threads(threads)
    folder = preset_folder(PRESET, tokenizer_dir, seed=0)  # the very weights our side starts from
    tokenizer = load_tokenizer_for(folder)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float32)
    pairs = read_pairs(DATA / "train.tsv")
    eos = tokenizer.eos_token_id

    def encode(texts: list[str]) -> list[list[int]]:
        return [
            row[: MAX_LENGTH - 1] + [eos] for row in tokenizer(texts, add_special_tokens=False)["input_ids"]
        ]

    dataset = [
        {"input_ids": s, "attention_mask": [1] * len(s), "labels": t}
        for s, t in zip(encode(pairs.sources), encode(pairs.targets))
    ]

    class Budget(TrainerCallback):
        """Stops at the wall-clock budget; clocks the optimizer steps from the first one."""

        started = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            Budget.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() - Budget.started >= 60 * minutes:
                control.should_training_stop = True

    arguments = Seq2SeqTrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=BATCH,
        max_steps=max_steps,
        learning_rate=LR,
        warmup_steps=WARMUP,  # a float below 1 is a share of the steps in transformers 5
        weight_decay=0.01,
        adam_beta2=0.999,
        max_grad_norm=1.0,
        lr_scheduler_type="linear",
        label_smoothing_factor=SMOOTHING,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        logging_steps=50,
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=arguments,
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        callbacks=[Budget()],
    )
    trainer.train()
    seconds = time.perf_counter() - Budget.started
    steps = trainer.state.global_step
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    return {"pairs_per_s": steps * BATCH / seconds, "steps": steps}


def scores(model: Path, out: Path, limit: int, threads: int) -> dict:
    args = [
        "evaluate",
        str(model),
        "--data",
        str(DATA / "test.tsv"),
        "--out",
        str(out),
        "--progress",
        "false",
    ]
    args += ["--limit", str(limit), "--threads", str(threads), "--num_beams", "4"]
    llmk(*args)
    report = json.loads((out / "eval.json").read_text())
    return {"bleu": report["bleu"], "chrf": report["chrf"]}


def mean_pair_tokens(tokenizer: Path) -> float:
    from llmkernel.io.pairs import read_pairs
    from llmkernel.io.tokenizers import load_tokenizer

    pairs, tokens = read_pairs(DATA / "train.tsv"), load_tokenizer(tokenizer)
    counted = tokens(pairs.sources + pairs.targets, add_special_tokens=False)["input_ids"]
    return sum(len(ids) + 1 for ids in counted) / len(pairs)  # + eos on each side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget of each side, minutes")
    parser.add_argument("--epochs", type=float, default=6.0, help="epochs the schedule spans (both sides)")
    parser.add_argument("--rounds", type=int, default=1, help="times the two sides alternate")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of each side (0: all cores)")
    parser.add_argument(
        "--test-limit", type=int, default=0, help="score the first N test pairs (0: all 2,000)"
    )
    parser.add_argument("--hf-side", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--max-steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_side:  # child process: one Trainer run, its figures on stdout
        figures = hf_trainer(Path(args.tokenizer), Path(args.out), args.minutes, args.threads, args.max_steps)
        print(json.dumps(figures))
        return
    if not DATA.is_dir():
        sys.exit(f"Tatoeba zh-en not found at {DATA} (shared data)")

    max_steps = math.ceil(args.epochs * math.ceil(TRAIN_PAIRS / BATCH))  # the same schedule on both sides
    runs: dict[str, list[dict]] = {"ours": [], "hf": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = prepare_tokenizer(root)
        for round_ in range(args.rounds):  # the sides alternate, so a change of load hits both
            mine = ours(tokenizer, root / f"ours-{round_}", args.minutes, args.threads, max_steps)
            mine.update(
                scores(root / f"ours-{round_}", root / f"ours-eval-{round_}", args.test_limit, args.threads)
            )
            runs["ours"].append(mine)
            command = [sys.executable, __file__, "--hf-side", "--tokenizer", str(tokenizer)]
            command += ["--out", str(root / f"hf-{round_}"), "--minutes", str(args.minutes)]
            command += ["--threads", str(args.threads), "--max-steps", str(max_steps)]
            result = subprocess.run(command, env=ENV, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"HF Seq2SeqTrainer run failed: {result.stderr[-2000:]}")
            theirs = json.loads(result.stdout.strip().splitlines()[-1])
            theirs.update(
                scores(root / f"hf-{round_}", root / f"hf-eval-{round_}", args.test_limit, args.threads)
            )
            runs["hf"].append(theirs)
        pair_tokens = mean_pair_tokens(tokenizer)

    def mean(side: str, key: str) -> float:
        return sum(run[key] for run in runs[side]) / len(runs[side])

    figures = {
        "model": PRESET,
        "minutes": args.minutes,
        "rounds": args.rounds,
        "threads": args.threads or os.cpu_count(),
        "test_pairs": args.test_limit or 2000,
        "bleu": round(mean("ours", "bleu"), 2),
        "chrf": round(mean("ours", "chrf"), 2),
        "hf_trainer_bleu": round(mean("hf", "bleu"), 2),
        "hf_trainer_chrf": round(mean("hf", "chrf"), 2),
        "bleu_vs_hf_trainer": round(mean("ours", "bleu") - mean("hf", "bleu"), 2),
        "pairs_per_s": round(mean("ours", "pairs_per_s"), 2),
        "hf_trainer_pairs_per_s": round(mean("hf", "pairs_per_s"), 2),
        "tokens_per_s": round(mean("ours", "pairs_per_s") * pair_tokens, 1),
        "hf_trainer_tokens_per_s": round(mean("hf", "pairs_per_s") * pair_tokens, 1),
        "ratio_vs_hf_trainer": round(mean("ours", "pairs_per_s") / mean("hf", "pairs_per_s"), 3),
        "steps": [run["steps"] for run in runs["ours"]],
        "hf_trainer_steps": [run["steps"] for run in runs["hf"]],
        "scheduled_steps": max_steps,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
