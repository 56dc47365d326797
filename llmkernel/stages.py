"""The one registry of stages, in pipeline order: prepare -> pretrain -> finetune -> index -> evaluate ->
prune -> distill -> quantize -> export -> serve (and `report`, which `llmk run` writes at the end).

`cli.py` builds one subcommand per entry and `pipeline.py` runs a recipe's sections in this order, feeding
each stage the folder an earlier one wrote (`takes`, `accepts`, `gives`). Each
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
    in_recipes: bool = True  # `llmk run` chains it
    # How `llmk run` chains it: the config field that takes an earlier stage's output folder when the
    # section names none, and the kinds of output it accepts (the latest of them); what its --out holds.
    takes: str = ""
    accepts: tuple[str, ...] = ()
    # "data", "model" (fp32 HF folder), "quantized" (a quantized folder), "index" (llmk index) or "" (a report)
    gives: str = ""
    recipe_run_path: str = ""  # "module:function" run in a recipe instead of run_path ('': run_path)

    def config_class(self) -> type:
        return _load(self.config_path)

    def run(self, config: Any) -> Any:
        return _load(self.run_path)(config)

    def run_in_recipe(self, config: Any, **options: Any) -> Any:
        """What `llmk run` does with this stage's section (serve: start, check every route, stop)."""
        if not self.recipe_run_path:
            return self.run(config)
        return _load(self.recipe_run_path)(config, **options)


def evaluate(config: Any) -> Any:
    """`llmk evaluate`: a retrieval set (a BEIR folder as --data, or an index folder as the model) is ranked
    by the retrieval package (dense, BM25, hybrid); any other file is a task's evaluation (eval). The choice
    lives here, above both stage packages, so that neither imports the other."""
    from llmkernel.io.beir import is_beir_folder
    from llmkernel.retrieval.index import is_index_folder

    if is_beir_folder(config.data) or is_index_folder(config.model):
        return _load("llmkernel.retrieval.evaluate:evaluate_retrieval")(config)
    return _load("llmkernel.eval.evaluate:evaluate")(config)


def _load(path: str) -> Any:
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


STAGES: tuple[Stage, ...] = (
    Stage(
        "prepare",
        "raw files -> clean text, a trained tokenizer and train/val token shards",
        "llmkernel.data.config:PrepareConfig",
        "llmkernel.data.pipeline:prepare",
        gives="data",
    ),
    Stage(
        "pretrain",
        "token shards -> a decoder (clm) or an encoder (mlm), from scratch or continued",
        "llmkernel.train.config:PretrainConfig",
        "llmkernel.train.pretrain:pretrain",
        takes="data",
        accepts=("data",),
        gives="model",
    ),
    Stage(
        "finetune",
        "adapt a model to classify / ner / sft data: full, top_layers or LoRA, optionally adversarial",
        "llmkernel.train.config:FinetuneConfig",
        "llmkernel.train.finetune:finetune",
        takes="model",
        accepts=("model",),
        gives="model",
    ),
    Stage(
        "index",
        "embed a corpus into a search index: vectors (exact or HNSW search), BM25, hybrid ranking",
        "llmkernel.retrieval.config:IndexConfig",
        "llmkernel.retrieval.build:build_index",
        takes="encoder",
        accepts=("model",),
        gives="index",
    ),
    Stage(
        "evaluate",
        "metrics of a model on a data file (report, confusion matrix, entity F1, perplexity), clean and attacked",
        "llmkernel.eval.config:EvaluateConfig",
        "llmkernel.stages:evaluate",
        takes="model",
        accepts=("model", "index"),  # an index folder: retrieval metrics of its encoder and BM25
    ),
    Stage(
        "prune",
        "remove FFN neurons, heads or layers (faster, stock HF config) or zero weights; optional recovery",
        "llmkernel.compress.config:PruneConfig",
        "llmkernel.compress.prune:prune",
        takes="model",
        accepts=("model",),
        gives="model",
    ),
    Stage(
        "distill",
        "train a smaller student on a task from a teacher's softened logits (and the task's labels)",
        "llmkernel.compress.config:DistillConfig",
        "llmkernel.compress.distill:distill",
        takes="teacher",
        accepts=("model",),
        gives="model",
    ),
    Stage(
        "quantize",
        "integer weights: int8 weights+activations for encoders, int8/int4 weight groups for decoders",
        "llmkernel.compress.config:QuantizeConfig",
        "llmkernel.compress.quantize:quantize",
        takes="model",
        accepts=("model",),
        gives="quantized",
    ),
    Stage(
        "export",
        "a model folder as plain safetensors, ONNX (checked with onnxruntime) or GGUF (checked with llama.cpp)",
        "llmkernel.compress.config:ExportConfig",
        "llmkernel.compress.export:export",
        takes="model",
        accepts=("model",),  # fp32 folders: export quantizes for its own runtime (gguf q8_0/q4_0)
    ),
    Stage(
        "serve",
        "serve a model folder over HTTP: OpenAI-compatible routes, API keys, rate limits, metrics",
        "llmkernel.serve.config:ServeConfig",
        "llmkernel.serve.server:serve",
        takes="model",
        accepts=("model", "quantized"),
        recipe_run_path="llmkernel.serve.probe:probe",  # start, check /ready and every route, stop
    ),
    Stage(
        "deploy",
        "render Kubernetes manifests for serving a model: Deployment, Service, PDB, Secret, HPA/KEDA autoscaling",
        "llmkernel.serve.deploy_config:DeployConfig",
        "llmkernel.serve.kubernetes:deploy",
        in_recipes=False,
    ),
    Stage(
        "report",
        "one self-contained HTML page (and its Markdown twin) over run folders: curves, tables, trade-offs",
        "llmkernel.report.config:ReportConfig",
        "llmkernel.report.build:report",
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
