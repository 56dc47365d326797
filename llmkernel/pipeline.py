"""`llmk run RECIPE.yaml` and `llmk demo`: chain the stages, each reading the folder the previous one wrote.

A recipe has one section per stage, in pipeline order (prepare, then later stages as they land); each
section holds that stage's config fields. `llmk demo` is the same thing on an embedded recipe whose input
is the documentation every CPython ships, so it runs anywhere with no download.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from llmkernel.config import build, load_yaml
from llmkernel.errors import ConfigError

STAGE_ORDER = ("prepare", "pretrain", "finetune", "evaluate")  # recipe sections run in this order

# The embedded demo; recipes/demo.yaml holds the same recipe (a test keeps them equal).
DEMO_RECIPE: dict[str, Any] = {
    "prepare": {
        "inputs": ["builtin:python-docs"],
        "out": "runs/demo/data",
        "tokenizer": {"kind": "bpe", "vocab_size": 4096},
        "pack": {"val_fraction": 0.05},
    },
    "pretrain": {
        "data": "runs/demo/data",
        "out": "runs/demo/model",
        "objective": "clm",
        "model": {"size": "tiny", "layers": 2, "width": 128, "heads": 4, "kv_heads": 2},
        "train": {
            "batch_size": 16,
            "seq_len": 128,
            "max_steps": 150,
            "eval_every": 75,
            "checkpoint_every": 75,
        },
        "optim": {"lr": 0.003, "warmup_steps": 20},
    },
}


def _stage(name: str):
    from llmkernel.cli import STAGES  # the one registry of stages and their config classes

    return next(stage for stage in STAGES if stage.name == name)


def _stage_config(stage: str, section: dict[str, Any], force: bool) -> Any:
    if not isinstance(section, dict):
        raise ConfigError(f"{stage}: expected a mapping of config fields")
    config_class = _stage(stage).config_class()
    if "force" in {f.name for f in dataclasses.fields(config_class)}:  # evaluate always runs
        section = {**section, "force": force or section.get("force", False)}
    return build(config_class, section, prefix=f"{stage}.")


def _run_stage(stage: str, config: Any) -> dict[str, Any]:
    return _stage(stage).run(config)


def run_stages(recipe: dict[str, Any], force: bool = False) -> dict[str, dict[str, Any]]:
    """Validate every section first (so a typo fails before hours of work), then run them in order."""
    unknown = sorted(set(recipe) - set(STAGE_ORDER))
    if unknown:
        raise ConfigError(f"unknown recipe section '{unknown[0]}'; known stages: {', '.join(STAGE_ORDER)}")
    configs = {stage: _stage_config(stage, recipe[stage], force) for stage in STAGE_ORDER if stage in recipe}
    if not configs:
        raise ConfigError(f"the recipe has no stage sections; add one of: {', '.join(STAGE_ORDER)}")
    return {stage: _run_stage(stage, config) for stage, config in configs.items()}


def run_recipe(path: str | Path, force: bool = False) -> dict[str, dict[str, Any]]:
    return run_stages(load_yaml(path), force=force)


def demo_recipe(out: str | Path) -> dict[str, Any]:
    """The demo recipe with its outputs under `out`."""
    recipe = copy.deepcopy(DEMO_RECIPE)
    recipe["prepare"]["out"] = recipe["pretrain"]["data"] = str(Path(out) / "data")
    recipe["pretrain"]["out"] = str(Path(out) / "model")
    return recipe


def run_demo(out: str | Path = "runs/demo", force: bool = False) -> None:
    recipe = demo_recipe(out)
    print(
        "LLM Kernel demo: preparing a corpus from the documentation that ships with this Python\n"
        "(pydoc topic pages and standard-library docstrings), with no download.\n"
    )
    run_stages(recipe, force=force)
    explain_prepare(Path(recipe["prepare"]["out"]))


def explain_prepare(data: Path) -> None:
    """Tell a new user what `llmk prepare` wrote and show a little of each output."""
    import json

    from llmkernel.io.files import iter_parts
    from llmkernel.io.shards import TokenShards
    from llmkernel.io.tokenizers import load_tokenizer

    stats = json.loads((data / "stats.json").read_text())
    tokenizer = load_tokenizer(data / "tokenizer")
    first = next(iter_parts(data / "clean"))
    masked = next(
        (r for r in iter_parts(data / "clean") if "<EMAIL>" in r["text"] or "<IP_ADDRESS>" in r["text"]), None
    )
    val = TokenShards(data, "val")
    sample_tokens = val.window(0, min(40, val.num_tokens)).tolist()
    sentence = "Lists are mutable sequences, typically used to store collections of items."
    pieces = tokenizer.tokenize(sentence)
    print(f"""
What the demo produced in {data}/:
  clean/      {stats["output"]["documents"]:,} kept documents as jsonl.gz (id, source, text); first: {first["id"]}
  excluded/   {sum(stats["dropped"].values()):,} dropped documents, each with its reason ({", ".join(stats["dropped"]) or "none"})
  tokenizer/  a byte-level BPE with {len(tokenizer):,} tokens; `AutoTokenizer.from_pretrained("{data}/tokenizer")` loads it
              "{sentence}"
              -> {len(pieces)} tokens: {" ".join(pieces[:14])} ...
  train/ val/ token shards ({stats["tokens"].get("train", 0):,} / {stats["tokens"].get("val", 0):,} tokens, {val.dtype.name}), described by shards.json
              the first val tokens decode to: {tokenizer.decode(sample_tokens)[:160]!r}
  stats.json  the counts printed above; run.json: config, input hashes, outputs and wall time""")
    if masked:
        at = min(i for i in (masked["text"].find("<EMAIL>"), masked["text"].find("<IP_ADDRESS>")) if i >= 0)
        print(
            f"  PII         masked in place, e.g. in {masked['id']}: ...{masked['text'][max(0, at - 60) : at + 40]!r}..."
        )


def explain_pretrain(model_dir: Path, metrics: dict[str, Any]) -> None:
    """Tell a new user what `llmk pretrain` wrote and let the model write a few lines."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = "The for statement"
    torch.manual_seed(0)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    output = model.generate(
        ids, max_new_tokens=40, do_sample=True, temperature=0.8, top_k=40, pad_token_id=tokenizer.pad_token_id
    )
    print(f"""
What the demo trained in {model_dir}/:
  a {metrics.get("parameters", 0) / 1e6:.2f}M-parameter decoder after {metrics.get("step")} steps
  ({metrics.get("tokens_seen", 0):,} tokens): validation loss {metrics.get("val_loss", float("nan")):.3f},
  {metrics.get("val_bits_per_byte", float("nan")):.3f} bits per byte (a uniform guess over bytes would be 8)
  config.json, model.safetensors, tokenizer: an HF folder, `AutoModelForCausalLM.from_pretrained("{model_dir}")`
  checkpoints/ (resume with --resume), metrics.jsonl, tb/ (tensorboard --logdir {model_dir}/tb), run.json
  a sample from the prompt {prompt!r}:
    {tokenizer.decode(output[0].tolist())!r}""")
