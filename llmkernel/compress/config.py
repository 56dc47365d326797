"""The schemas of `llmk quantize`, `llmk prune`, `llmk distill` and `llmk export` (CLI flags, recipe
sections, run.json). Each reads a model folder and writes a new one beside a `compress.json` that puts the
source and the result side by side."""

from __future__ import annotations

from dataclasses import dataclass

from llmkernel.config import check, option
from llmkernel.tasks import FINETUNE_TASKS
from llmkernel.train.config import (
    FinetuneDataConfig,
    OptimConfig,
    TrainConfig,
    finetune_optim_defaults,
    finetune_train_defaults,
)

QUANTIZE_MODES = ("int8", "int4")
PRUNE_METHODS = ("structured", "unstructured")
SPARSITY_CRITERIA = ("wanda", "magnitude")
SPARSITY_SCOPES = ("row", "layer", "global")
EXPORT_FORMATS = ("safetensors", "onnx", "gguf")
EXPORT_DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")

# Fields that say how to run, not what comes out (left out of the run's fingerprint).
RUN_ONLY_FIELDS = ("out", "force", "progress", "threads", "train.threads", "train.log_every")


@dataclass
class MeasureConfig:
    """How source and result are compared in compress.json."""

    eval: str = option(
        "",
        "file for the task metric: a labeled table (classify), CoNLL (ner) or a text file (decoders: "
        "perplexity and bits per byte); '': no metric, sizes and speed only",
    )
    limit: int = option(0, "use only the first N evaluation examples (0: all)")
    batch_size: int = option(32, "encoders: rows of the fixed latency batch")
    seq_len: int = option(64, "encoders: tokens per row of the fixed latency batch")
    decode_tokens: int = option(
        32, "decoders: tokens generated per prompt for the speed and agreement checks"
    )
    repeats: int = option(5, "timed repetitions of the fixed batch (the median is reported)")

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "decode_tokens", "repeats"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        check(self.limit >= 0, "limit", "must be >= 0")


@dataclass
class QuantizeConfig:
    """`llmk quantize`: integer weights. Encoders (classifiers, NER): int8 weights and int8 activations on
    the CPU's integer dot products. Decoders: weight-only int8 or int4 in groups, stored packed."""

    model: str = option("", "model folder to quantize (ours or any HF folder)", positional=True)
    out: str = option("runs/quantize", "output: the quantized model folder, compress.json, run.json")
    mode: str = option(
        "int8", "int8 (encoders: weights and activations; decoders: weights) or int4 (decoders)"
    )
    group_size: int = option(
        32,
        "decoders, int4: weights per quantization group along the input (32, 64, 128; int8 uses one scale per row)",
    )
    calibration: str = option(
        "",
        "encoders: a file like the eval file whose first examples fix static activation scales "
        "('': activations scaled per call)",
    )
    calibration_samples: int = option(128, "examples (or text windows) read from --calibration")
    keep: list[str] = option(
        factory=list, help="module names left in fp32 (default: the task head, e.g. classifier)"
    )
    measure: MeasureConfig = option(factory=MeasureConfig)
    threads: int = option(0, "CPU threads (0: all cores)")
    force: bool = option(False, "quantize again even when --out holds this result")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        check(bool(self.model), "model", "required: the model folder to quantize")
        check(self.mode in QUANTIZE_MODES, "mode", f"must be one of {', '.join(QUANTIZE_MODES)}")
        check(
            self.group_size >= 8 and self.group_size & (self.group_size - 1) == 0,
            "group_size",
            "must be a power of two >= 8 (32, 64, 128...)",
        )
        check(self.calibration_samples >= 1, "calibration_samples", "must be >= 1")
        check(self.threads >= 0, "threads", "must be >= 0")


@dataclass
class RecoveryConfig:
    """Fine-tuning after pruning, by distillation from the unpruned model through the one training loop."""

    steps: int = option(0, "optimizer steps of recovery (0: none)")
    task: str = option(
        "", f"task of the recovery data ('': from the model, one of {', '.join(FINETUNE_TASKS)})"
    )
    temperature: float = option(2.0, "softmax temperature of the teacher's and the student's logits")
    distill_weight: float = option(
        0.5, "weight of the distillation loss; the task loss gets 1 - this (0: plain fine-tuning)"
    )
    data: FinetuneDataConfig = option(factory=FinetuneDataConfig)
    train: TrainConfig = option(factory=finetune_train_defaults)
    optim: OptimConfig = option(factory=finetune_optim_defaults)

    def __post_init__(self) -> None:
        check(self.steps >= 0, "steps", "must be >= 0")
        check(self.temperature > 0, "temperature", "must be > 0")
        check(0 <= self.distill_weight <= 1, "distill_weight", "must be in [0, 1]")
        check(
            not self.steps or bool(self.data.train),
            "data.train",
            "recovery (--recover.steps > 0) needs a training file: --recover.data.train",
        )


@dataclass
class PruneConfig:
    """`llmk prune`: structured pruning (FFN neurons, attention heads, whole layers) to a stock HF config
    that runs faster, or unstructured sparsity (magnitude / Wanda), then optional recovery."""

    model: str = option("", "model folder to prune (ours or any HF folder)", positional=True)
    out: str = option("runs/prune", "output: the pruned model folder, compress.json, run.json")
    method: str = option("structured", "structured (neurons, heads, layers) or unstructured (zeroed weights)")
    ffn: float = option(0.0, "structured: share of FFN neurons removed in every layer, in [0, 1)")
    heads: float = option(
        0.0, "structured: share of attention heads removed in every layer (decoders), in [0, 1)"
    )
    layers: int = option(0, "structured: whole layers dropped, those that change the hidden state least")
    layer_criterion: str = option(
        "removal",
        "structured --layers: rank layers by how much leaving each out changes the output (removal) or by "
        "ShortGPT's block influence (influence)",
    )
    sparsity: float = option(0.5, "unstructured: share of each block's Linear weights set to zero, in [0, 1)")
    criterion: str = option("wanda", "unstructured: wanda (|weight| x input norm) or magnitude (|weight|)")
    scope: str = option(
        "row", "unstructured: rank weights within each output row (Wanda's choice), each layer, or globally"
    )
    calibration: str = option(
        "",
        "file whose first examples measure importance (a labeled table, CoNLL or text; '': --recover.data.train, "
        "then --measure.eval)",
    )
    calibration_samples: int = option(128, "examples (or text windows) read from the calibration file")
    recover: RecoveryConfig = option(factory=RecoveryConfig)
    measure: MeasureConfig = option(factory=MeasureConfig)
    threads: int = option(0, "CPU threads (0: all cores)")
    force: bool = option(False, "prune again even when --out holds this result")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        check(bool(self.model), "model", "required: the model folder to prune")
        check(self.method in PRUNE_METHODS, "method", f"must be one of {', '.join(PRUNE_METHODS)}")
        check(0 <= self.ffn < 1, "ffn", "must be in [0, 1)")
        check(0 <= self.heads < 1, "heads", "must be in [0, 1)")
        check(self.layers >= 0, "layers", "must be >= 0")
        check(
            self.layer_criterion in ("removal", "influence"),
            "layer_criterion",
            "must be removal or influence",
        )
        check(0 <= self.sparsity < 1, "sparsity", "must be in [0, 1)")
        check(
            self.criterion in SPARSITY_CRITERIA, "criterion", f"must be one of {', '.join(SPARSITY_CRITERIA)}"
        )
        check(self.scope in SPARSITY_SCOPES, "scope", f"must be one of {', '.join(SPARSITY_SCOPES)}")
        check(
            self.method != "structured" or bool(self.ffn or self.heads or self.layers),
            "method",
            "structured pruning needs --ffn, --heads or --layers (e.g. --ffn 0.5 or --layers 2)",
        )
        check(self.calibration_samples >= 1, "calibration_samples", "must be >= 1")
        check(self.threads >= 0, "threads", "must be >= 0")


@dataclass
class DistillConfig:
    """`llmk distill`: train a smaller student on a task with the teacher's softened logits (Hinton et al.
    2015) mixed with the task loss, through the one training loop and the task objects of fine-tuning."""

    task: str = option(
        help="the task: classify, ner or sft (the data's format)", positional=True, choices=FINETUNE_TASKS
    )
    teacher: str = option("", "the model to learn from: a fine-tuned folder (from llmk finetune)")
    student: str = option(
        "",
        "the model to train: a pruned folder (llmk prune --layers ...) or a smaller HF folder, same tokenizer",
    )
    out: str = option("runs/distill", "output: the student folder, eval.json, compress.json, run.json")
    temperature: float = option(2.0, "softmax temperature of both models' logits")
    distill_weight: float = option(0.5, "weight of the distillation loss; the task loss gets 1 - this")
    epochs: float = option(0.0, "passes over the training data (0: from its size, aiming at ~800 steps)")
    data: FinetuneDataConfig = option(factory=FinetuneDataConfig)
    train: TrainConfig = option(factory=finetune_train_defaults)
    optim: OptimConfig = option(factory=finetune_optim_defaults)
    measure: MeasureConfig = option(factory=MeasureConfig)
    resume: bool = option(False, "continue from the last checkpoint in --out")
    force: bool = option(False, "start over even if --out holds checkpoints or a finished run")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        check(self.task in FINETUNE_TASKS, "task", f"must be one of {', '.join(FINETUNE_TASKS)}")
        check(bool(self.teacher), "teacher", "required: the fine-tuned model to learn from")
        check(bool(self.student), "student", "required: the smaller model to train")
        check(bool(self.data.train), "data.train", "required: the training file")
        check(self.temperature > 0, "temperature", "must be > 0")
        check(0 <= self.distill_weight <= 1, "distill_weight", "must be in [0, 1]")
        check(self.epochs >= 0, "epochs", "must be >= 0")
        check(
            not (self.resume and self.force), "resume", "--resume and --force contradict each other; pick one"
        )


@dataclass
class ExportConfig:
    """`llmk export`: a model folder in the formats other runtimes read: a plain HF folder (safetensors,
    adapters merged), ONNX (checked with onnxruntime) or GGUF (checked with llama.cpp)."""

    model: str = option("", "model folder to export", positional=True)
    out: str = option("runs/export", "output folder: the exported files, compress.json, run.json")
    format: str = option(
        "safetensors", "safetensors, onnx (encoders, classifiers, NER, decoders) or gguf (Llama)"
    )
    dtype: str = option("f32", "safetensors: f32, f16 or bf16; gguf: f32, f16, q8_0 or q4_0; onnx: f32")
    check: bool = option(True, "run the exported file in its runtime (onnxruntime, llama.cpp) against ours")
    sample_text: str = option(
        "", "gguf: text whose tokenization llama.cpp must reproduce ('': a built-in sample)"
    )
    prompt: str = option("", "gguf: prompt of the greedy-generation check ('': a built-in one)")
    force: bool = option(False, "export again even when --out holds this result")

    def __post_init__(self) -> None:
        check(bool(self.model), "model", "required: the model folder to export")
        check(self.format in EXPORT_FORMATS, "format", f"must be one of {', '.join(EXPORT_FORMATS)}")
        allowed = {
            "safetensors": ("f32", "f16", "bf16"),
            "gguf": ("f32", "f16", "q8_0", "q4_0"),
            "onnx": ("f32",),
        }
        check(
            self.dtype in allowed[self.format],
            "dtype",
            f"--format {self.format} takes {', '.join(allowed[self.format])}",
        )
