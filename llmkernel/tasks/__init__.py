"""Tasks: one file per task, each owning its data, batches, loss, predictions, metrics and report.

The registry names every task with the class that implements it, imported on first use (tasks import
torch; the CLI's `--help` does not). Adding a task is a new file here and one line in TASKS.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from llmkernel.errors import InputError

TASKS = {
    "classify": "llmkernel.tasks.classify:Classify",  # text (pair) classification
    "ner": "llmkernel.tasks.ner:TokenClassify",  # named entities, one tag per word
    "sft": "llmkernel.tasks.sft:ChatSFT",  # chat tuning, loss on the assistant's tokens
    "relation": "llmkernel.tasks.relation:RelationClassify",  # relations between two marked entities
    "embed": "llmkernel.tasks.embed:ContrastiveEmbed",  # retrieval embeddings, in-batch negatives
    "seq2seq": "llmkernel.tasks.seq2seq:Seq2Seq",  # translation: encoder-decoder, BLEU/chrF
    "lm": "llmkernel.tasks.clm:TextFileLM",  # a decoder's perplexity on a text file (evaluate only)
    "clm": "llmkernel.tasks.clm:CausalLM",  # next-token pretraining on token shards
    "mlm": "llmkernel.tasks.mlm:MaskedLM",  # masked-token pretraining on token shards
}
FINETUNE_TASKS = ("classify", "ner", "sft", "relation", "embed", "seq2seq")  # `llmk finetune TASK`
# `llmk evaluate --task`, in the order auto tries them
EVALUATE_TASKS = ("classify", "ner", "sft", "relation", "lm", "embed", "seq2seq")
PRETRAIN_OBJECTIVES = {
    "clm": "decoder",
    "mlm": "encoder",
}  # `llmk pretrain --objective`: the preset it trains


def task_class(name: str) -> type:
    """The class of the task called `name` (a key of TASKS)."""
    module, _, attribute = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def task_for_model(kind: str, data: str | Path) -> type:
    """The evaluation task for a model of `kind` (models.loading.model_kind) on the file `data`."""
    for name in EVALUATE_TASKS:
        cls = task_class(name)
        if cls.model_kind == kind and cls.accepts(data):
            return cls
    served = sorted({task_class(name).model_kind for name in EVALUATE_TASKS})
    raise InputError(
        f"no task evaluates a {kind} model (tasks evaluate {', '.join(served)} models); "
        f"pass --task {'|'.join(EVALUATE_TASKS)}"
    )
