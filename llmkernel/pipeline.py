"""`llmk run RECIPE.yaml` and `llmk demo`: chain the stages, each reading the folder the previous one wrote.

A recipe has one section per stage; each section holds that stage's config fields, and the sections run in
the order of `stages.py` (prepare, pretrain, finetune, evaluate), whatever their order in the file. `serve`
runs until stopped, so a recipe does not chain it. `llmk demo` is the same thing on an embedded recipe
whose input is the documentation every CPython ships, so it runs anywhere with no download, and then
explains what each stage wrote.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from llmkernel.config import build, load_yaml
from llmkernel.errors import ConfigError
from llmkernel.stages import RECIPE_STAGES, STAGES, stage

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


def stage_config(name: str, section: dict[str, Any], force: bool = False) -> Any:
    """The config of recipe section `name` (`--force` of `llmk run` applies to every stage that has one)."""
    if not isinstance(section, dict):
        raise ConfigError(f"{name}: expected a mapping of config fields")
    config_class = stage(name).config_class()
    if "force" in {f.name for f in dataclasses.fields(config_class)}:
        section = {**section, "force": force or section.get("force", False)}
    return build(config_class, section, prefix=f"{name}.")


def check_sections(recipe: dict[str, Any]) -> None:
    """Every section of `recipe` names a stage that a recipe chains, and there is at least one."""
    known = ", ".join(RECIPE_STAGES)
    for name in recipe:
        if name in RECIPE_STAGES:
            continue
        if name in {entry.name for entry in STAGES}:
            raise ConfigError(
                f"recipe section '{name}': `llmk run` does not chain {name}; run `llmk {name} --config RECIPE` "
                f"after it (a recipe chains {known})"
            )
        raise ConfigError(f"unknown recipe section '{name}'; known stages: {known}")
    if not recipe:
        raise ConfigError(f"the recipe has no stage sections; add one of: {known}")


def run_stages(recipe: dict[str, Any], force: bool = False) -> dict[str, dict[str, Any]]:
    """Validate every section first (so a typo fails before hours of work), then run them in pipeline order.

    Returns each stage's metrics by stage name. A training stage stopped by Ctrl-C or SIGTERM checkpoints
    and returns; the later stages then do not run on its unfinished output.
    """
    check_sections(recipe)
    configs = {name: stage_config(name, recipe[name], force) for name in RECIPE_STAGES if name in recipe}
    results: dict[str, dict[str, Any]] = {}
    for name, config in configs.items():
        results[name] = stage(name).run(config)
        if _stopped(results[name]):
            later = [n for n in configs if n not in results]
            if later:
                print(f"{name} was stopped; not running {', '.join(later)} (continue with --resume)")
            break
    return results


def _stopped(metrics: Any) -> bool:
    return isinstance(metrics, dict) and metrics.get("stopped_by") in ("SIGINT", "SIGTERM")


def run_recipe(path: str | Path, force: bool = False) -> dict[str, dict[str, Any]]:
    return run_stages(load_yaml(path), force=force)


def demo_recipe(out: str | Path) -> dict[str, Any]:
    """The demo recipe with its outputs under `out`."""
    recipe = copy.deepcopy(DEMO_RECIPE)
    recipe["prepare"]["out"] = recipe["pretrain"]["data"] = str(Path(out) / "data")
    recipe["pretrain"]["out"] = str(Path(out) / "model")
    return recipe


def run_demo(out: str | Path = "runs/demo", force: bool = False) -> None:
    """Prepare the embedded corpus, pretrain a small decoder on it, then show what each stage wrote."""
    recipe = demo_recipe(out)
    print(
        "LLM Kernel demo: preparing a corpus from the documentation that ships with this Python\n"
        "(pydoc topic pages and standard-library docstrings), with no download, then pretraining a\n"
        "small decoder on it.\n"
    )
    metrics = run_stages(recipe, force=force)
    explain_prepare(Path(recipe["prepare"]["out"]))
    if not _stopped(metrics["pretrain"]):
        explain_pretrain(Path(recipe["pretrain"]["out"]), metrics["pretrain"])


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
    """Tell a new user what `llmk pretrain` wrote (`metrics`: what it returned) and let the model write."""
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
    sample = tokenizer.decode(output[0].tolist(), skip_special_tokens=True)
    nan = float("nan")
    print(f"""
What the demo trained in {model_dir}/:
  model       a {metrics.get("parameters", 0) / 1e6:.2f}M-parameter decoder, {metrics.get("step")} steps over {metrics.get("tokens_seen", 0):,} tokens
              validation loss {metrics.get("val_loss", nan):.3f}, {metrics.get("val_bits_per_byte", nan):.3f} bits per byte (a uniform guess over bytes would be 8)
  HF folder   config.json, model.safetensors, tokenizer.json: `AutoModelForCausalLM.from_pretrained("{model_dir}")` loads it
  checkpoints/ resume with --resume; metrics.jsonl and tb/ (tensorboard --logdir {model_dir}/tb); run.json
  sample      from the prompt {prompt!r}:
              {sample[:200]!r}""")
