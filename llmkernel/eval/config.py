"""`EvaluateConfig`: the schema of `llmk evaluate` (CLI flags, recipe section, run.json)."""

from __future__ import annotations

from dataclasses import dataclass

from llmkernel.config import check, option
from llmkernel.eval.attacks import ATTACKS
from llmkernel.tasks import EVALUATE_TASKS

# Fields that say how to run, not what comes out (left out of the run's fingerprint).
RUN_ONLY_FIELDS = ("out", "force", "progress", "threads", "batch_size")


@dataclass
class EvaluateConfig:
    """`llmk evaluate`: metrics of a model folder on a data file, clean and under attack."""

    model: str = option(
        "",
        "model folder (from llmk finetune / pretrain, any HF folder), a known name, or an index folder (llmk index)",
        positional=True,
    )
    data: str = option(
        "",
        "evaluation file: table (classify), CoNLL (ner), jsonl with marked entities (relation), text (lm), "
        "jsonl chats (sft) or a BEIR folder (embed)",
    )
    task: str = option(
        "auto", f"auto (from the model's architecture and the file), or one of {', '.join(EVALUATE_TASKS)}"
    )
    out: str = option("runs/evaluate", "folder for eval.json (and confusion_matrix.png)")
    text_column: str | None = option(None, "classify: column with the text (null: detected)")
    pair_column: str | None = option(None, "classify: column with the second text (null: detected)")
    label_column: str | None = option(None, "classify: column with the label (null: detected)")
    source_column: str | None = option(None, "seq2seq, sft on pairs: column with the source (null: detected)")
    target_column: str | None = option(
        None, "seq2seq, sft on pairs: column with the reference (null: detected)"
    )
    num_beams: int = option(4, "seq2seq: beam size of the translations (1: greedy)")
    prompt_template: str = option("{source}", "sft on pairs: the user turn, {source} replaced by the source")
    split: str = option("test", "retrieval (a BEIR folder as --data): the qrels split to rank for")
    limit: int = option(0, "evaluate only the first N examples (0: all)")
    max_length: int = option(0, "longest input in tokens (0: the model's context, at most 512; lm: 1024)")
    batch_size: int = option(32, "examples per forward pass")
    attack: str = option("none", "none, typo, swap, delete or hotflip")
    attack_rate: float = option(0.1, "share of the words (typo/swap/delete) or tokens (hotflip) to perturb")
    seed: int = option(0, "seed of the attack")
    sample_tokens: int = option(48, "sft: tokens of each sample reply")
    threads: int = option(0, "CPU threads (0: all cores)")
    force: bool = option(
        False, "evaluate again even when --out holds this evaluation of the same model and data"
    )
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        check(bool(self.model), "model", "required: the model folder to evaluate")
        check(bool(self.data), "data", "required: the evaluation file")
        check(
            self.task in ("auto", *EVALUATE_TASKS),
            "task",
            f"must be auto or one of {', '.join(EVALUATE_TASKS)}",
        )
        check(self.attack in ("none", *ATTACKS), "attack", f"must be none or one of {', '.join(ATTACKS)}")
        check(0 < self.attack_rate <= 1, "attack_rate", "must be in (0, 1]")
        for name in ("limit", "max_length", "threads"):
            check(getattr(self, name) >= 0, name, "must be >= 0")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.num_beams >= 1, "num_beams", "must be >= 1")
