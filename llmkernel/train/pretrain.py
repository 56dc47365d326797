"""`llmk pretrain`: a decoder (clm) or an encoder (mlm) trained on the token shards of `llmk prepare`.

Output (`--out`): a Hugging Face model folder (config.json, model.safetensors, tokenizer, generation
config) that AutoModelForCausalLM / AutoModelForMaskedLM load, plus checkpoints/, tb/, metrics.jsonl and
run.json. run.json is written last: a folder without it is an unfinished run, which `--resume` continues.
Under `torchrun --nproc-per-node N` the same command trains data-parallel (DDP, or FSDP with
`--train.strategy fsdp`; gloo on CPU, nccl on GPUs).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from llmkernel import dist, tasks
from llmkernel.config import to_dict
from llmkernel.errors import ConfigError, InputError
from llmkernel.io.shards import read_shards_manifest
from llmkernel.io.tokenizers import load_tokenizer
from llmkernel.models.attention import use_causal_attention
from llmkernel.models.loading import load_model, model_kind, resolve_model
from llmkernel.models.presets import build_model, count_parameters, flops_per_token
from llmkernel.runs import (
    Manifest,
    check_writable_parent,
    describe_inputs,
    files_into,
    fingerprint,
    read_manifest,
)
from llmkernel.runtime import configure_threads, keep_freed_memory, matmul_peak_flops
from llmkernel.train.checkpoint import load_checkpoint, open_output
from llmkernel.train.compile import compile_decision
from llmkernel.train.config import RUN_ONLY_FIELDS, PretrainConfig
from llmkernel.train.loop import Start, Throughput, train
from llmkernel.train.optim import build_optimizer, build_scheduler
from llmkernel.train.parallel import full_state_dict, wrap_for_training

STAGE = "pretrain"


def pretrain(config: PretrainConfig) -> dict[str, Any]:
    """Run `llmk pretrain`; returns the final metrics (also in run.json)."""
    rank_info = dist.init()
    try:
        return _pretrain(config, rank_info)
    finally:
        dist.cleanup()


def _pretrain(config: PretrainConfig, rank_info: dist.DistInfo) -> dict[str, Any]:
    started = time.time()
    out, data = Path(config.out), Path(config.data)
    check_writable_parent(out)
    shards = read_shards_manifest(data)
    tokenizer = load_tokenizer(data / shards.get("tokenizer", "tokenizer"))
    resolved = to_dict(config)
    inputs = describe_inputs(
        [data / "shards.json", data / shards.get("tokenizer", "tokenizer") / "tokenizer.json"]
    )
    run_fingerprint = fingerprint(resolved, inputs, RUN_ONLY_FIELDS)
    checkpoints = open_output(out, STAGE, run_fingerprint, config.resume, config.force, rank_info)
    if checkpoints is None:
        return read_manifest(out)["metrics"]

    configure_threads(config.train.threads, rank_info.world_size)
    keep_freed_memory()
    torch.manual_seed(config.train.seed)
    objective = tasks.task_class(config.objective)
    model = _build_or_load(config, objective, tokenizer, shards)  # its checks first: they name the data's fix
    task = objective.from_shards(str(data), tokenizer, config.train, config.mask_probability)
    kind = task.preset
    counts = count_parameters(model)
    model_flops = flops_per_token(model, config.train.seq_len, task.head_fraction())
    peak = dist.broadcast_object(matmul_peak_flops() if rank_info.is_main else None)
    dist.print0(
        f"{kind} model: {counts['total'] / 1e6:.2f}M parameters ({counts['trainable'] / 1e6:.2f}M trainable), "
        f"{model_flops / 1e6:.1f} MFLOPs per token; fp32 matmul peak {peak / 1e9:.0f} GFLOP/s per process"
    )
    model.to(rank_info.device)
    compile_module, compile_note = compile_decision(
        config.train.compile, rank_info.device, config.train.max_steps, task.static_shapes
    )
    if compile_module and kind == "decoder":  # a compiled run is long enough to pay the kernel's one build
        dist.print0(f"attention: {use_causal_attention(model, cpu_kernel=rank_info.device.type == 'cpu')}")
    train_module = wrap_for_training(task.wrap(model), config.train.strategy, rank_info, compile_module)
    dist.print0(f"training step: {compile_note}")
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.train.max_steps, config.optim)
    start = Start()
    if config.resume:
        state = load_checkpoint(checkpoints[-1], train_module, optimizer, scheduler, rank_info)
        start = Start(state["step"], state["extra"].get("tokens_seen", 0))
        dist.print0(f"resuming from {checkpoints[-1]} (step {start.step})")
    if rank_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    result = train(
        task=task,
        model=model,
        train_module=train_module,
        optimizer=optimizer,
        scheduler=scheduler,
        config=config.train,
        grad_clip=config.optim.grad_clip,
        out=out,
        run_config=resolved,
        rank_info=rank_info,
        progress=config.progress,
        start=start,
        throughput=Throughput(model_flops, peak),
    )
    if result.stopped_by in ("SIGINT", "SIGTERM"):
        return {"step": result.step, "stopped_by": result.stopped_by}

    metrics = {
        "step": result.step,
        "tokens_seen": result.tokens_seen,
        "train_loss": result.train_loss,
        **{f"val_{k}": v for k, v in result.val_metrics.items()},
        "parameters": counts["total"],
        "flops_per_token": model_flops,
        "stopped_by": result.stopped_by,
    }
    weights = full_state_dict(model)  # collective: FSDP gathers the shards onto rank 0
    if rank_info.is_main:
        _save_model(model, weights, tokenizer, out)
        Manifest(STAGE, resolved, inputs, run_fingerprint, started_at=started, metrics=metrics).write(out)
        dist.print0(
            f"model saved to {out}: "
            + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        )
    dist.barrier()
    return metrics


def _build_or_load(config: PretrainConfig, task: type, tokenizer, shards: dict[str, Any]):
    """The model the objective (the task class) trains, checked against the data's vocabulary and the sequence length."""
    seq_len = config.train.seq_len
    vocab_size = shards["vocab_size"]
    if config.model.init_from:
        folder = resolve_model(config.model.init_from)
        fresh_head = {} if model_kind(folder) != task.model_kind else None  # e.g. MLM from a bare encoder
        model = load_model(folder, task.model_kind, new_head=fresh_head)
        model_vocab = model.get_input_embeddings().weight.shape[0]
        if model_vocab < vocab_size or _vocab_differs(folder, tokenizer):
            raise InputError(
                f"the data was tokenized with a vocabulary of {vocab_size} that does not match {folder}'s "
                f"({model_vocab}); prepare the data with --tokenizer.from_model {config.model.init_from}"
            )
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and seq_len > limit:
            raise ConfigError(f"train.seq_len: {seq_len} is larger than the model's context length {limit}")
        return model
    context = config.model.context_length or seq_len
    if seq_len > context:
        raise ConfigError(f"train.seq_len: {seq_len} is larger than model.context_length {context}")
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    return build_model(config.model, task.preset, vocab_size, context, special)


def _vocab_differs(folder: Path, tokenizer) -> bool:
    try:
        model_tokenizer = load_tokenizer(folder)
    except InputError:
        return False  # a model folder without a tokenizer: only the size check applies
    return model_tokenizer.get_vocab() != tokenizer.get_vocab()


def _save_model(model, weights: dict[str, torch.Tensor], tokenizer, out: Path) -> None:
    """Write the HF folder files next to checkpoints/: into a temp folder, then renamed into place.

    `weights` is the model's whole state (`full_state_dict`): under FSDP the model itself holds shards.
    """
    with files_into(out) as temporary:
        model.save_pretrained(temporary, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(temporary)
