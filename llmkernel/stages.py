"""The one registry of stages, in pipeline order: prepare -> pretrain -> finetune -> evaluate -> prune ->
distill -> quantize -> export -> serve.

`cli.py` builds one subcommand per entry and `pipeline.py` runs a recipe's sections in this order. Each
entry names its config class and run function as "module:attribute" and imports them only when asked,
so `llmk --help` does not import torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stage:
    """One stage: its command name, a one-line summary, where its schema and its work live."""

    name: str
    summary: str
    config_path: str  # "module:ClassName" of the stage's config dataclass
    run_path: str  # "module:function" taking that config, returning the stage's metrics
    in_recipes: bool = True  # `llmk run` chains it (serve runs until stopped, so it is not chained)

    def config_class(self) -> type:
        return _load(self.config_path)

    def run(self, config: Any) -> Any:
        return _load(self.run_path)(config)


def _load(path: str) -> Any:
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


STAGES: tuple[Stage, ...] = (
    Stage(
        "prepare",
        "raw files -> clean text, a trained tokenizer and train/val token shards",
        "llmkernel.data.config:PrepareConfig",
        "llmkernel.data.pipeline:prepare",
    ),
    Stage(
        "pretrain",
        "token shards -> a decoder (clm) or an encoder (mlm), from scratch or continued",
        "llmkernel.train.config:PretrainConfig",
        "llmkernel.train.pretrain:pretrain",
    ),
    Stage(
        "finetune",
        "adapt a model to classify / ner / sft data: full, top_layers or LoRA, optionally adversarial",
        "llmkernel.train.config:FinetuneConfig",
        "llmkernel.train.finetune:finetune",
    ),
    Stage(
        "evaluate",
        "metrics of a model on a data file (report, confusion matrix, entity F1, perplexity), clean and attacked",
        "llmkernel.eval.config:EvaluateConfig",
        "llmkernel.eval.evaluate:evaluate",
    ),
    Stage(
        "prune",
        "remove FFN neurons, heads or layers (faster, stock HF config) or zero weights; optional recovery",
        "llmkernel.compress.config:PruneConfig",
        "llmkernel.compress.prune:prune",
    ),
    Stage(
        "distill",
        "train a smaller student on a task from a teacher's softened logits (and the task's labels)",
        "llmkernel.compress.config:DistillConfig",
        "llmkernel.compress.distill:distill",
    ),
    Stage(
        "quantize",
        "integer weights: int8 weights+activations for encoders, int8/int4 weight groups for decoders",
        "llmkernel.compress.config:QuantizeConfig",
        "llmkernel.compress.quantize:quantize",
    ),
    Stage(
        "export",
        "a model folder as plain safetensors, ONNX (checked with onnxruntime) or GGUF (checked with llama.cpp)",
        "llmkernel.compress.config:ExportConfig",
        "llmkernel.compress.export:export",
    ),
    Stage(
        "serve",
        "serve a model folder over HTTP: OpenAI-compatible routes, API keys, rate limits, metrics",
        "llmkernel.serve.config:ServeConfig",
        "llmkernel.serve.server:serve",
        in_recipes=False,
    ),
)

RECIPE_STAGES: tuple[str, ...] = tuple(stage.name for stage in STAGES if stage.in_recipes)


def stage(name: str) -> Stage:
    """The stage called `name` (KeyError for a name that is not one)."""
    for entry in STAGES:
        if entry.name == name:
            return entry
    raise KeyError(name)
