"""Fine-tuning methods, applied to a model (composition, not subclasses): full, top_layers K, LoRA.

* `full`: every parameter trains.
* `top_layers`: the embeddings and all but the top K transformer blocks are frozen; the top blocks, the
  final norm and the task head train (cheap transfer learning, as in Howard and Ruder 2018).
* `lora`: low-rank adapters (Hu et al. 2021) via `peft` on every linear layer of the transformer blocks
  (detected per architecture), the new task head trained in full; `merge_lora` folds them back in.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from llmkernel.errors import ConfigError

METHODS = ("full", "top_layers", "lora")


def transformer_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's stack of transformer blocks: the longest ModuleList (BERT `encoder.layer`, Llama
    `model.layers`, GPT-2 `h`) and its qualified name."""
    lists = [
        (name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.ModuleList)
    ]
    if not lists:
        raise ConfigError(f"{type(model).__name__}: no stack of transformer blocks found for this method")
    return max(lists, key=lambda item: len(item[1]))


def freeze_all_but_top_layers(model: torch.nn.Module, keep: int) -> None:
    """Freeze the embeddings and every block below the top `keep`; everything else (top blocks, final
    norm, pooler, task head) stays trainable."""
    name, blocks = transformer_blocks(model)
    if not 1 <= keep <= len(blocks):
        raise ConfigError(f"top_layers: must be between 1 and the model's {len(blocks)} blocks, got {keep}")
    frozen_blocks = {f"{name}.{i}." for i in range(len(blocks) - keep)}
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
    for parameter_name, parameter in model.named_parameters():
        in_frozen_block = any(parameter_name.startswith(prefix) for prefix in frozen_blocks)
        is_embedding = id(parameter) in embeddings or any(
            "embed" in part for part in parameter_name.split(".")
        )
        parameter.requires_grad_(not (in_frozen_block or is_embedding))


def lora_targets(model: torch.nn.Module) -> str:
    """A regular expression (peft's full-match form) for every nn.Linear inside the transformer blocks."""
    name, blocks = transformer_blocks(model)
    leaves = sorted(
        {n.rsplit(".", 1)[-1] for n, m in blocks.named_modules() if isinstance(m, torch.nn.Linear)}
    )
    if not leaves:
        raise ConfigError("lora: no linear layers found in the transformer blocks; set lora.target_modules")
    return rf"(.*\.)?{re.escape(name)}\.\d+\.(.*\.)?({'|'.join(map(re.escape, leaves))})"


def apply_lora(
    model: torch.nn.Module,
    task: Any,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: list[str],
):
    """Wrap `model` with LoRA adapters for `task` (its peft task type; its head trains in full); returns the
    peft model (its base layers frozen)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules or lora_targets(model),
        modules_to_save=task.head_modules(model) or None,
        task_type=task.peft_task_type,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:  # e.g. target modules that do not exist
        raise ConfigError(f"lora.target_modules: {error}") from None


def trainable_share(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """A plain model with the adapters folded into the weights (W + BA), loadable without peft."""
    return model.merge_and_unload() if is_peft(model) else model
