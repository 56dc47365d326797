"""Source and result side by side: what every compression command writes to compress.json.

For each model: parameters (and how many are non-zero), bytes on disk, bytes of the Linear layers'
weights, latency and throughput on a fixed input, and the task metric on `--measure.eval`. Encoders run a
fixed batch (`batch_size` x `seq_len` token ids, seeded); decoders decode greedily from fixed prompts at
batch 1 (single stream, with the KV cache), where CPU decoding is bound by reading the weights. For
decoders the quality gates of the issue are measured too: perplexity / bits per byte on the eval text,
greedy-token agreement with the source over the prompts, and the largest logit error on a fixed batch.
"""

from __future__ import annotations

import inspect
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from llmkernel import tasks
from llmkernel.compress.config import MeasureConfig
from llmkernel.errors import InputError
from llmkernel.runs import atomic_write_json

COMPRESS_FILE = "compress.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".onnx", ".onnx_data", ".pt")
PROMPTS = (
    "The meaning of life is",
    "Once upon a time, in a small village,",
    "To make a good cup of tea, you",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
)


def folder_bytes(folder: str | Path) -> int:
    """Bytes of the weight files of a model folder (not its checkpoints/, tokenizer or config files)."""
    return sum(
        p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES
    )


def linear_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the matrix layers (nn.Linear and our quantized ones) of `model`, bias included."""
    from llmkernel.models.int8 import Int8Linear
    from llmkernel.models.weight_only import WeightOnlyLinear

    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear | Int8Linear | WeightOnlyLinear):
            tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(values, non-zero values) over parameters and integer weight buffers: what unstructured sparsity
    changes (the first stays, the second falls)."""
    values = nonzero = 0
    seen: set[int] = set()
    for tensor in list(model.parameters()) + [b for b in model.buffers() if not b.is_floating_point()]:
        if id(tensor) in seen:  # tied weights count once
            continue
        seen.add(id(tensor))
        values += tensor.numel()
        nonzero += int(torch.count_nonzero(tensor))
    return values, nonzero


def _median_seconds(run, repeats: int) -> tuple[float, float, float]:
    run()  # warm-up: lazy packing, allocator, first-call dispatch
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times), min(times), max(times)


def fixed_batch(vocab_size: int, batch_size: int, seq_len: int, special: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(special, vocab_size, (batch_size, seq_len), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.inference_mode()
def encoder_speed(model: torch.nn.Module, config: MeasureConfig) -> dict[str, float]:
    batch = fixed_batch(
        model.config.vocab_size, config.batch_size, config.seq_len, special=1000 % model.config.vocab_size
    )
    median, low, high = _median_seconds(lambda: model(**batch), config.repeats)
    return {
        "latency_ms": 1000 * median,
        "latency_ms_range": [1000 * low, 1000 * high],
        "rows_per_s": config.batch_size / median,
        "batch": [config.batch_size, config.seq_len],
    }


@torch.inference_mode()
def greedy(model: torch.nn.Module, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], float]:
    """`new_tokens` greedy (argmax) tokens after `prompt_ids` at batch 1 with the KV cache, never stopping
    at eos; (token ids, seconds spent decoding after the prompt)."""
    # transformers 5.x renamed `past_key_values` to `cache` (the old name warns); serve/decoder.py does the same
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    step, cache, tokens = torch.tensor([prompt_ids]), None, []
    started = None
    for _ in range(new_tokens):
        output = model(input_ids=step, use_cache=True, logits_to_keep=1, **{name: cache})
        cache = getattr(output, name)
        tokens.append(int(output.logits[0, -1].argmax()))
        step = torch.tensor([[tokens[-1]]])
        started = started or time.perf_counter()  # the prompt's forward is not decoding
    return tokens, time.perf_counter() - started


def decoder_speed(model: torch.nn.Module, tokenizer, config: MeasureConfig) -> tuple[dict[str, float], list]:
    """Single-stream decode speed over the fixed prompts (after one warm-up), and the greedy tokens."""
    greedy(model, tokenizer(PROMPTS[0])["input_ids"], 4)
    generated, seconds = [], 0.0
    for prompt in PROMPTS:
        tokens, elapsed = greedy(model, tokenizer(prompt)["input_ids"], config.decode_tokens)
        generated.append(tokens)
        seconds += elapsed
    decoded = len(PROMPTS) * (config.decode_tokens - 1)
    return {"tokens_per_s": decoded / max(seconds, 1e-9), "prompts": len(PROMPTS)}, generated


def task_metrics(
    model, tokenizer, kind: str, config: MeasureConfig, eval_task: str = "auto"
) -> dict[str, Any]:
    """The task's headline metrics of `model` on `config.eval` ({} without an eval file)."""
    if not config.eval:
        return {}
    task_class = (
        tasks.task_for_model(kind, config.eval) if eval_task == "auto" else tasks.task_class(eval_task)
    )
    if task_class.model_kind != kind:
        raise InputError(
            f"{config.eval}: a {task_class.name} file, but the model is a {kind}; pass an eval file of the model's task"
        )
    limit = getattr(model.config, "max_position_embeddings", None) or 1024
    max_length = min(limit, 1024 if kind == "decoder" else 512)
    task = task_class.for_evaluation(config.eval, model, tokenizer, max_length, 32, {}, config.limit)
    report = task.report(model, torch.device("cpu"))
    return {k: report[k] for k in task_class.headline if isinstance(report.get(k), int | float)}


def measure(model, tokenizer, kind: str, folder: str | Path | None, config: MeasureConfig) -> dict[str, Any]:
    """Everything compress.json says about one model (`folder`: where it is stored, for bytes on disk)."""
    model.eval()
    values, nonzero = parameter_counts(model)
    result: dict[str, Any] = {
        "parameters": values,
        "nonzero_parameters": nonzero,
        "linear_weight_bytes": linear_weight_bytes(model),
    }
    if folder is not None:
        result["bytes_on_disk"] = folder_bytes(folder)
    if kind == "decoder":
        speed, generated = decoder_speed(model, tokenizer, config)
        result.update(speed)
        result["_generated"] = generated
    else:
        result.update(encoder_speed(model, config))
    result["metrics"] = task_metrics(model, tokenizer, kind, config)
    return result


@torch.inference_mode()
def logit_error(source, result, vocab_size: int) -> dict[str, float]:
    """Largest absolute logit difference on a fixed batch, and relative to the source's largest logit."""
    batch = fixed_batch(vocab_size, 2, 32)
    a = source(**batch).logits.float()
    b = result(**batch).logits.float()
    largest = float((a - b).abs().max())
    return {"max_logit_error": largest, "relative_logit_error": largest / max(float(a.abs().max()), 1e-9)}


def agreement(source_tokens: list[list[int]], result_tokens: list[list[int]]) -> float:
    """Share of greedy tokens equal to the source's, each prompt counted up to its first difference."""
    same = total = 0
    for a, b in zip(source_tokens, result_tokens):
        total += len(a)
        for x, y in zip(a, b):
            if x != y:
                break
            same += 1
    return same / max(total, 1)


HEADLINE = {"classifier": "accuracy", "token_classifier": "f1", "decoder": "perplexity"}


def compare(kind: str, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Ratios of result to source: speed-up, bytes, parameters, and the headline metric's change
    (accuracy/F1: points lost; perplexity: relative increase as a fraction, 0.02 = 2%)."""
    speed_key = "tokens_per_s" if kind == "decoder" else "rows_per_s"
    out: dict[str, Any] = {
        "speedup": after[speed_key] / before[speed_key],
        "linear_bytes_ratio": after["linear_weight_bytes"] / max(before["linear_weight_bytes"], 1),
        "parameters_ratio": after["parameters"] / max(before["parameters"], 1),
        "nonzero_ratio": after["nonzero_parameters"] / max(before["nonzero_parameters"], 1),
    }
    if "bytes_on_disk" in before and "bytes_on_disk" in after:
        out["bytes_ratio"] = after["bytes_on_disk"] / max(before["bytes_on_disk"], 1)
    metric = HEADLINE.get(kind)
    if metric and metric in before["metrics"] and metric in after["metrics"]:
        b, a = before["metrics"][metric], after["metrics"][metric]
        out["metric"] = metric
        out["metric_drop"] = (a / b - 1) if metric == "perplexity" else 100 * (b - a)
    return out


def write_compress_json(folder: Path, document: dict[str, Any]) -> None:
    for side in ("source", "result"):
        document.get(side, {}).pop("_generated", None)
    atomic_write_json(folder / COMPRESS_FILE, document)


def summary_line(stage: str, comparison: dict[str, Any]) -> str:
    parts = [f"{stage}: {comparison['speedup']:.2f}x speed"]
    if "bytes_ratio" in comparison:
        parts.append(f"{comparison['bytes_ratio']:.0%} of the bytes on disk")
    parts.append(f"Linear weights {comparison['linear_bytes_ratio']:.0%}")
    if "metric_drop" in comparison:
        drop = comparison["metric_drop"]
        parts.append(
            f"perplexity {drop:+.1%}"
            if comparison["metric"] == "perplexity"
            else f"{comparison['metric']} {-drop:+.2f} points"
        )
    return ", ".join(parts)
