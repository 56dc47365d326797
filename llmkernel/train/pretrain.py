"""`llmk pretrain`: a decoder (clm) or an encoder (mlm) trained on the token shards of `llmk prepare`.

Output (`--out`): a Hugging Face model folder (config.json, model.safetensors, tokenizer, generation
config) that AutoModelForCausalLM / AutoModelForMaskedLM load, plus checkpoints/, tb/, metrics.jsonl and
run.json. run.json is written last: a folder without it is an unfinished run, which `--resume` continues.
Under `torchrun --nproc-per-node N` the same command trains data-parallel (DDP, or FSDP on GPUs).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from llmkernel import dist
from llmkernel.config import to_dict
from llmkernel.errors import ConfigError, InputError
from llmkernel.io.shards import read_shards_manifest
from llmkernel.io.tokenizers import load_tokenizer
from llmkernel.models.attention import use_causal_attention
from llmkernel.models.loading import resolve_model
from llmkernel.models.presets import build_model, count_parameters, flops_per_token
from llmkernel.runs import Manifest, check_writable_parent, describe_inputs, fingerprint, read_manifest
from llmkernel.runtime import configure_threads, keep_freed_memory, matmul_peak_flops
from llmkernel.tasks.clm import CausalLM
from llmkernel.tasks.mlm import MaskedLM
from llmkernel.train.checkpoint import load_checkpoint, open_output
from llmkernel.train.compile import compile_decision
from llmkernel.train.config import RUN_ONLY_FIELDS, PretrainConfig
from llmkernel.train.loop import train
from llmkernel.train.optim import build_optimizer, build_scheduler
from llmkernel.train.parallel import wrap_for_training

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
    model, kind = _build_or_load(config, tokenizer, shards)
    counts = count_parameters(model)
    head_fraction = (
        config.mask_probability if config.objective == "mlm" else 1.0
    )  # MLM's head runs on masked only
    model_flops = flops_per_token(model, config.train.seq_len, head_fraction)
    peak = dist.broadcast_object(matmul_peak_flops() if rank_info.is_main else None)
    dist.print0(
        f"{kind} model: {counts['total'] / 1e6:.2f}M parameters ({counts['trainable'] / 1e6:.2f}M trainable), "
        f"{model_flops / 1e6:.1f} MFLOPs per token; fp32 matmul peak {peak / 1e9:.0f} GFLOP/s per process"
    )
    model.to(rank_info.device)
    seq_len, batch = config.train.seq_len, config.train.batch_size
    if config.objective == "clm":
        task = CausalLM(str(data), tokenizer, batch, seq_len, config.train.seed, config.train.eval_batches)
    else:
        task = MaskedLM(
            str(data),
            tokenizer,
            batch,
            seq_len,
            config.train.seed,
            config.train.eval_batches,
            config.mask_probability,
        )
    # MLM's masked positions change in number every step; causal windows keep one shape.
    compile_module, compile_note = compile_decision(
        config.train.compile, rank_info.device, config.train.max_steps, config.objective == "clm"
    )
    if compile_module and kind == "decoder":  # a compiled run is long enough to pay the kernel's one build
        dist.print0(f"attention: {use_causal_attention(model, cpu_kernel=rank_info.device.type == 'cpu')}")
    train_module = wrap_for_training(
        task.wrap(model) if hasattr(task, "wrap") else model, config.train.strategy, rank_info, compile_module
    )
    dist.print0(f"training step: {compile_note}")
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.train.max_steps, config.optim)
    start_step, tokens_seen = 0, 0
    if config.resume:
        state = load_checkpoint(checkpoints[-1], train_module, optimizer, scheduler, rank_info)
        start_step, tokens_seen = state["step"], state["extra"].get("tokens_seen", 0)
        dist.print0(f"resuming from {checkpoints[-1]} (step {start_step})")
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
        out=out,
        progress=config.progress,
        run_config=resolved,
        rank_info=rank_info,
        start_step=start_step,
        tokens_seen=tokens_seen,
        flops_per_token=model_flops,
        peak_flops=peak,
        grad_clip=config.optim.grad_clip,
        sample=getattr(task, "sample", None) if kind == "decoder" else None,
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
    if rank_info.is_main:
        _save_model(model, tokenizer, out)
        Manifest(STAGE, resolved, inputs, run_fingerprint, started_at=started, metrics=metrics).write(out)
        dist.print0(
            f"model saved to {out}: "
            + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        )
    dist.barrier()
    return metrics


def _build_or_load(config: PretrainConfig, tokenizer, shards: dict[str, Any]):
    """The model to train and its kind, checked against the data's vocabulary and the sequence length."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    kind = "decoder" if config.objective == "clm" else "encoder"
    seq_len = config.train.seq_len
    vocab_size = shards["vocab_size"]
    if config.model.init_from:
        folder = resolve_model(config.model.init_from)
        loader = AutoModelForCausalLM if kind == "decoder" else AutoModelForMaskedLM
        try:
            model = loader.from_pretrained(folder, dtype=torch.float32)
        except (OSError, ValueError) as error:
            raise InputError(f"{folder}: cannot load as a {kind} for {config.objective} ({error})") from None
        model_vocab = model.get_input_embeddings().weight.shape[0]
        if model_vocab < vocab_size or _vocab_differs(folder, tokenizer):
            raise InputError(
                f"the data was tokenized with a vocabulary of {vocab_size} that does not match {folder}'s "
                f"({model_vocab}); prepare the data with --tokenizer.from_model {config.model.init_from}"
            )
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and seq_len > limit:
            raise ConfigError(f"train.seq_len: {seq_len} is larger than the model's context length {limit}")
        return model, kind
    context = config.model.context_length or seq_len
    if seq_len > context:
        raise ConfigError(f"train.seq_len: {seq_len} is larger than model.context_length {context}")
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    return build_model(config.model, kind, vocab_size, context, special), kind


def _vocab_differs(folder: Path, tokenizer) -> bool:
    try:
        model_tokenizer = load_tokenizer(folder)
    except InputError:
        return False  # a model folder without a tokenizer: only the size check applies
    return model_tokenizer.get_vocab() != tokenizer.get_vocab()


def _save_model(model, tokenizer, out: Path) -> None:
    """Write the HF folder files next to checkpoints/: into a temp folder, then renamed into place."""
    temporary = out / f".model-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary, safe_serialization=True)
    tokenizer.save_pretrained(temporary)
    for path in temporary.iterdir():
        os.replace(path, out / path.name)
    temporary.rmdir()
