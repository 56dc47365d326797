"""Training configs: the loop's section (`train`), the optimizer's (`optim`) and the `llmk pretrain` stage.

`TrainConfig` and `OptimConfig` are shared by pretraining and every fine-tuning task: one loop, one schema.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmkernel.config import check, option
from llmkernel.models.presets import ModelConfig
from llmkernel.tasks import FINETUNE_TASKS, PRETRAIN_OBJECTIVES

SCHEDULES = ("cosine", "linear", "wsd", "constant")
DTYPES = ("auto", "fp32", "bf16")
STRATEGIES = ("ddp", "fsdp")
COMPILE_SETTINGS = ("auto", "true", "false")
# Fields of pretrain/finetune that say how to run, not what comes out (left out of the run's fingerprint).
RUN_ONLY_FIELDS = ("out", "resume", "force", "progress", "train.compile", "train.threads")


@dataclass
class OptimConfig:
    """AdamW with weight decay on matrices only, warmup then cosine or warmup-stable-decay."""

    lr: float = option(1e-3, "peak learning rate (fine-tuning: 0 picks it from the method and model width)")
    min_lr_ratio: float = option(0.1, "final learning rate as a share of the peak")
    warmup_steps: int = option(
        100, "steps of linear warmup from 0 to the peak (fine-tuning: -1 is 6% of the steps)"
    )
    schedule: str = option(
        "cosine", "after warmup: cosine, linear, wsd (stable then linear decay) or constant"
    )
    decay_fraction: float = option(0.2, "wsd: share of the steps spent decaying at the end")
    weight_decay: float = option(0.1, "decoupled weight decay, on matrices only (not norms, biases)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")

    def __post_init__(self) -> None:
        check(self.lr >= 0, "lr", "must be > 0 (or 0 for fine-tuning's automatic choice)")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be between 0 and 1")
        check(self.warmup_steps >= -1, "warmup_steps", "must be >= 0 (or -1: automatic, fine-tuning)")
        check(self.schedule in SCHEDULES, "schedule", f"must be one of {', '.join(SCHEDULES)}")
        check(0 < self.decay_fraction <= 1, "decay_fraction", "must be in (0, 1]")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1/beta2", "must be in [0, 1)")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0")


@dataclass
class TrainConfig:
    """The training loop: batch, length, evaluation, checkpoints, precision and distribution."""

    batch_size: int = option(16, "sequences per micro-batch on each process")
    grad_accum: int = option(
        1, "micro-batches per optimizer step (global batch = batch_size x grad_accum x processes)"
    )
    seq_len: int = option(
        256, "tokens per training sequence (fine-tuning: the longest kept, 0: from the data's lengths)"
    )
    max_steps: int = option(
        1000, "optimizer steps; the learning-rate schedule spans them (fine-tuning: 0 = from epochs)"
    )
    time_limit_minutes: float = option(
        0.0, "stop early (with a checkpoint and the model) after this long (0: no limit)"
    )
    eval_every: int = option(
        200, "evaluate every N steps and at the end (0: only at the end; fine-tuning: every epoch)"
    )
    eval_batches: int = option(20, "validation batches per evaluation")
    sample_tokens: int = option(64, "decoders: tokens of sample generation at each evaluation (0: none)")
    checkpoint_every: int = option(200, "save a checkpoint every N steps and at the end (0: only at the end)")
    keep_checkpoints: int = option(2, "keep the last K checkpoints")
    log_every: int = option(10, "write metrics every N steps")
    seed: int = option(0, "seed for initialisation, data order and masking")
    dtype: str = option("auto", "auto (fp32 on CPU, bf16 autocast on GPUs that support it), fp32 or bf16")
    compile: str = option(
        "auto",
        "torch.compile the training forward/backward: true, false, or auto (pretraining runs of at least "
        "300 steps on a GPU, or on a CPU with a C++ compiler; the first step then takes ~30 s longer)",
    )
    strategy: str = option(
        "ddp", "with torchrun: ddp (whole replicas) or fsdp (weights, gradients, optimizer state sharded)"
    )
    threads: int = option(0, "CPU threads per process (0: the cores available / processes)")

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "eval_batches", "keep_checkpoints", "log_every"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        # seq_len and max_steps may be 0 ("automatic") for fine-tuning; PretrainConfig asks for >= 1.
        for name in ("seq_len", "max_steps", "eval_every", "checkpoint_every", "sample_tokens", "threads"):
            check(getattr(self, name) >= 0, name, "must be >= 0")
        check(self.time_limit_minutes >= 0, "time_limit_minutes", "must be >= 0")
        check(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}")
        check(self.strategy in STRATEGIES, "strategy", f"must be one of {', '.join(STRATEGIES)}")
        self.compile = str(self.compile).lower()  # run.json files before "auto" hold a bool
        check(self.compile in COMPILE_SETTINGS, "compile", f"must be one of {', '.join(COMPILE_SETTINGS)}")


@dataclass
class PretrainConfig:
    """`llmk pretrain`: train a decoder (clm) or an encoder (mlm) on the token shards of `llmk prepare`."""

    data: str = option(
        "runs/data", "folder written by `llmk prepare` (shards.json, train/, val/, tokenizer/)"
    )
    out: str = option(
        "runs/pretrain", "output: an HF model folder plus checkpoints/, tb/, metrics.jsonl, run.json"
    )
    objective: str = option("clm", "clm (next-token prediction, decoders) or mlm (masked tokens, encoders)")
    mask_probability: float = option(
        0.15, "mlm: share of tokens to predict (80% [MASK], 10% random, 10% kept)"
    )
    model: ModelConfig = option(factory=ModelConfig)
    train: TrainConfig = option(factory=TrainConfig)
    optim: OptimConfig = option(factory=OptimConfig)
    resume: bool = option(False, "continue from the last checkpoint in --out")
    force: bool = option(False, "start over even if --out holds checkpoints or a finished run")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        check(
            self.objective in PRETRAIN_OBJECTIVES,
            "objective",
            f"must be one of {', '.join(PRETRAIN_OBJECTIVES)}",
        )
        check(0 < self.mask_probability < 1, "mask_probability", "must be in (0, 1)")
        check(
            not (self.resume and self.force), "resume", "--resume and --force contradict each other; pick one"
        )
        check(self.train.seq_len >= 1, "train.seq_len", "must be >= 1")
        check(self.train.max_steps >= 1, "train.max_steps", "must be >= 1")
        check(self.optim.lr > 0, "optim.lr", "must be > 0")
        check(self.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        kind = self.model.kind
        check(
            kind in ("auto", PRETRAIN_OBJECTIVES.get(self.objective)),
            "model.kind",
            f"{kind} does not fit objective {self.objective} (clm trains decoders, mlm encoders)",
        )


FINETUNE_METHODS = ("full", "top_layers", "lora")
ADVERSARIAL = ("none", "fgm", "pgd", "freelb")


@dataclass
class FinetuneDataConfig:
    """Labeled data: files, columns and lengths."""

    train: str = option(
        "",
        "training file: csv/tsv/jsonl/parquet (classify), CoNLL (ner), jsonl chats (sft), "
        "jsonl with two marked entities (relation), "
        "a BEIR folder or jsonl pairs (embed)",
    )
    eval: str = option("", "evaluation file of the same format ('': hold out eval_fraction of train)")
    eval_fraction: float = option(0.1, "share of train held out for evaluation when no eval file is given")
    text_column: str | None = option(None, "classify: column with the text (null: detected)")
    pair_column: str | None = option(None, "classify: column with the second text of a pair (null: detected)")
    label_column: str | None = option(None, "classify: column with the label (null: detected)")
    limit: int = option(0, "use only the first N training rows (0: all)")
    class_weights: str = option(
        "auto",
        "classify/ner: weight labels by inverse frequency: auto (when the commonest is 3x the rarest), true, false",
    )
    label_names: list[str] = option(
        factory=list,
        help="classify: names for the label values in their sorted order, e.g. negative positive for 0 1 "
        "(empty: the values themselves); what eval.json and the server show",
    )
    source_column: str | None = option(
        None, "seq2seq, sft on a table: column with the source text (null: src, source, input or prompt)"
    )
    target_column: str | None = option(
        None, "seq2seq, sft on a table: column with the target text (null: tgt, target, output, ...)"
    )
    prompt_template: str = option(
        "{source}", "sft on a table of pairs: the user turn, with {source} replaced by the source text"
    )
    label_smoothing: float = option(0.1, "seq2seq: label smoothing of the target cross-entropy")
    num_beams: int = option(4, "seq2seq: beam size when translating the evaluation set (1: greedy)")
    group_by_length: str = option(
        "auto",
        "batch examples of similar length together (less padding): auto (on, except seq2seq, where it "
        "slows learning), true, false",
    )
    packing: bool = option(True, "sft: concatenate conversations into full rows of train.seq_len tokens")
    scale: float = option(
        20.0, "embed: InfoNCE scale of the cosine similarities (1 / temperature; sentence-transformers' 20)"
    )
    symmetric: bool = option(False, "embed: add the documents-to-queries direction to the loss")
    hard_negatives: int = option(
        0, "embed: hard negatives per pair, mined with the starting model before training (0: in-batch only)"
    )

    def __post_init__(self) -> None:
        check(0 < self.eval_fraction < 1, "eval_fraction", "must be in (0, 1)")
        check(self.limit >= 0, "limit", "must be >= 0")
        check(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        check(self.num_beams >= 1, "num_beams", "must be >= 1")
        check(self.scale > 0, "scale", "must be > 0")
        check(self.hard_negatives >= 0, "hard_negatives", "must be >= 0")
        self.class_weights = str(self.class_weights).lower()
        check(self.class_weights in ("auto", "true", "false"), "class_weights", "must be auto, true or false")
        self.group_by_length = str(self.group_by_length).lower()
        check(
            self.group_by_length in ("auto", "true", "false"),
            "group_by_length",
            "must be auto, true or false",
        )


@dataclass
class LoraConfig:
    """LoRA adapters (method lora)."""

    rank: int = option(8, "rank r of the low-rank update BA")
    alpha: float = option(16.0, "scaling: the update is multiplied by alpha / rank")
    dropout: float = option(0.05, "dropout on the adapters' input")
    target_modules: list[str] = option(
        factory=list, help="module names to adapt (empty: every linear layer of the transformer blocks)"
    )

    def __post_init__(self) -> None:
        check(self.rank >= 1, "rank", "must be >= 1")
        check(self.alpha > 0, "alpha", "must be > 0")
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")


@dataclass
class AdversarialConfig:
    """Adversarial training on the input embeddings (works with every task and method)."""

    method: str = option("none", "none, fgm, pgd or freelb")
    epsilon: float = option(
        0.05, "perturbation size, relative to each sequence's embedding norm (freelb: its bound, 0 = none)"
    )
    step_size: float = option(
        0.02, "pgd/freelb: each ascent step, relative to the embedding norm (freelb: also the random start)"
    )
    steps: int = option(3, "pgd/freelb: ascent steps per batch")

    def __post_init__(self) -> None:
        check(self.method in ADVERSARIAL, "method", f"must be one of {', '.join(ADVERSARIAL)}")
        check(self.epsilon >= 0, "epsilon", "must be >= 0")
        check(self.step_size > 0, "step_size", "must be > 0")
        check(self.steps >= 1, "steps", "must be >= 1")


def finetune_train_defaults() -> TrainConfig:
    return TrainConfig(
        batch_size=32,
        seq_len=0,
        max_steps=0,
        eval_every=0,
        checkpoint_every=0,
        sample_tokens=48,
        log_every=10,
    )


def finetune_optim_defaults() -> OptimConfig:
    # BERT-style fine-tuning: linear decay to 0 after a short warmup, light decay, Adam's usual beta2.
    return OptimConfig(
        lr=0.0, warmup_steps=-1, schedule="linear", min_lr_ratio=0.0, weight_decay=0.01, beta2=0.999
    )


@dataclass
class FinetuneConfig:
    """`llmk finetune`: adapt a model to a labeled task (classify, ner, sft) with full, top-layers or LoRA
    training, optionally adversarial. Unset values (0) are derived from the data, the method and the model."""

    task: str = option(
        help="the task: classify (labels of texts), ner (labels of tokens), relation (between two marked "
        "entities), sft (chat replies) or seq2seq "
        "(translation with an encoder-decoder)",
        positional=True,
        choices=FINETUNE_TASKS,
    )
    model: str = option(
        "",
        "model to start from: an HF folder, a .gguf file, all-minilm-l6-v2 or smollm2-135m-instruct, "
        "or a preset trained from scratch (seq2seq-tiny/small/base, decoder-tiny/small/base) with --tokenizer",
    )
    tokenizer: str = option(
        "", "preset models: the tokenizer folder to build them on (`llmk prepare`'s OUT/tokenizer)"
    )
    out: str = option("runs/finetune", "output: the tuned HF model folder, eval.json, checkpoints/, run.json")
    method: str = option("full", "full, top_layers (train only the top K blocks and the head) or lora")
    top_layers: int = option(2, "top_layers: how many of the top transformer blocks train")
    merge: bool = option(
        False, "lora: write a plain HF folder with the adapters merged (the adapter in adapter/)"
    )
    epochs: float = option(0.0, "passes over the training data (0: from its size, aiming at ~800 steps)")
    eval_metric: str = option("", "metric for early stopping and the best model ('': accuracy, f1 or loss)")
    patience: int = option(2, "stop after this many evaluations without improvement (0: never stop early)")
    data: FinetuneDataConfig = option(factory=FinetuneDataConfig)
    lora: LoraConfig = option(factory=LoraConfig)
    adversarial: AdversarialConfig = option(factory=AdversarialConfig)
    train: TrainConfig = option(factory=finetune_train_defaults)
    optim: OptimConfig = option(factory=finetune_optim_defaults)
    resume: bool = option(False, "continue from the last checkpoint in --out")
    force: bool = option(False, "start over even if --out holds checkpoints or a finished run")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        check(self.task in FINETUNE_TASKS, "task", f"must be one of {', '.join(FINETUNE_TASKS)}")
        check(bool(self.model), "model", "required: an HF folder, a .gguf file or all-minilm-l6-v2")
        check(bool(self.data.train), "data.train", "required: the training file")
        check(self.method in FINETUNE_METHODS, "method", f"must be one of {', '.join(FINETUNE_METHODS)}")
        check(self.top_layers >= 1, "top_layers", "must be >= 1")
        check(self.epochs >= 0, "epochs", "must be >= 0")
        check(self.patience >= 0, "patience", "must be >= 0")
        check(not (self.merge and self.method != "lora"), "merge", "only applies to --method lora")
        check(
            not (self.merge and self.train.strategy == "fsdp"),
            "merge",
            "not with --train.strategy fsdp yet (the sharded model cannot be merged on one rank); "
            "train without --merge and load the adapter folder, which every stage merges on load",
        )
        check(
            not (self.resume and self.force), "resume", "--resume and --force contradict each other; pick one"
        )
