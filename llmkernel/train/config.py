"""Training configs: the loop's section (`train`), the optimizer's (`optim`) and the `llmk pretrain` stage.

`TrainConfig` and `OptimConfig` are shared by pretraining and every fine-tuning task: one loop, one schema.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmkernel.config import check, option
from llmkernel.models.presets import ModelConfig

SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = ("auto", "fp32", "bf16")
STRATEGIES = ("ddp", "fsdp")
OBJECTIVES = ("clm", "mlm")


@dataclass
class OptimConfig:
    """AdamW with weight decay on matrices only, warmup then cosine or warmup-stable-decay."""

    lr: float = option(1e-3, "peak learning rate")
    min_lr_ratio: float = option(0.1, "final learning rate as a share of the peak")
    warmup_steps: int = option(100, "steps of linear warmup from 0 to the peak")
    schedule: str = option("cosine", "after warmup: cosine, wsd (stable then linear decay) or constant")
    decay_fraction: float = option(0.2, "wsd: share of the steps spent decaying at the end")
    weight_decay: float = option(0.1, "decoupled weight decay, on matrices only (not norms, biases)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", "must be > 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be between 0 and 1")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
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
    seq_len: int = option(256, "tokens per training sequence")
    max_steps: int = option(1000, "optimizer steps; the learning-rate schedule spans them")
    time_limit_minutes: float = option(
        0.0, "stop early (with a checkpoint and the model) after this long (0: no limit)"
    )
    eval_every: int = option(200, "evaluate every N steps and at the end (0: only at the end)")
    eval_batches: int = option(20, "validation batches per evaluation")
    sample_tokens: int = option(64, "decoders: tokens of sample generation at each evaluation (0: none)")
    checkpoint_every: int = option(200, "save a checkpoint every N steps and at the end (0: only at the end)")
    keep_checkpoints: int = option(2, "keep the last K checkpoints")
    log_every: int = option(10, "write metrics every N steps")
    seed: int = option(0, "seed for initialisation, data order and masking")
    dtype: str = option("auto", "auto (fp32 on CPU, bf16 autocast on GPUs that support it), fp32 or bf16")
    compile: bool = option(False, "torch.compile the model")
    strategy: str = option("ddp", "with torchrun: ddp, or fsdp (GPUs)")
    threads: int = option(0, "CPU threads per process (0: the cores available / processes)")

    def __post_init__(self) -> None:
        for name in (
            "batch_size",
            "grad_accum",
            "seq_len",
            "max_steps",
            "eval_batches",
            "keep_checkpoints",
            "log_every",
        ):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("eval_every", "checkpoint_every", "sample_tokens", "threads"):
            check(getattr(self, name) >= 0, name, "must be >= 0")
        check(self.time_limit_minutes >= 0, "time_limit_minutes", "must be >= 0")
        check(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}")
        check(self.strategy in STRATEGIES, "strategy", f"must be one of {', '.join(STRATEGIES)}")


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
        check(self.objective in OBJECTIVES, "objective", f"must be one of {', '.join(OBJECTIVES)}")
        check(0 < self.mask_probability < 1, "mask_probability", "must be in (0, 1)")
        check(
            not (self.resume and self.force), "resume", "--resume and --force contradict each other; pick one"
        )
        kind = self.model.kind
        check(
            kind == "auto" or (kind == "decoder") == (self.objective == "clm"),
            "model.kind",
            f"{kind} does not fit objective {self.objective} (clm trains decoders, mlm encoders)",
        )
