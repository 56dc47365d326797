"""`llmk export`: a model folder in the formats other runtimes read, each checked in that runtime.

* `safetensors`: a plain HF folder at f32, f16 or bf16 (LoRA adapters merged on load);
* `onnx` (`compress.onnx`): encoders, classifiers, NER models and decoders without KV cache, dynamic batch
  and sequence axes; checked with onnxruntime at batch 1, 2 and 7 and lengths 5, 64 and 128 (largest
  absolute difference at most 1e-4 in fp32) with both runtimes' latency;
* `gguf` (`compress.gguf`): Llama-style decoders (our trained tokenizers included) for llama.cpp, in f32,
  f16, Q8_0 or Q4_0; checked with llama.cpp itself: its tokenization of a sample text and its greedy
  generation against ours.

The result goes to `--out` through a staging folder with compress.json (the checks) and run.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmkernel.compress.common import finished_metrics, open_job
from llmkernel.compress.config import ExportConfig
from llmkernel.compress.measure import folder_bytes
from llmkernel.errors import InputError, MissingExtraError
from llmkernel.models.loading import load_model, load_tokenizer_for
from llmkernel.models.quantized import is_quantized
from llmkernel.runs import staging_folder

STAGE = "export"
TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
ONNX_LIMIT = 1e-4
SAMPLE_TEXT = "Hello world! First Citizen: Before we proceed any further, hear me speak. 3.14 naïve café\n  tabs\tand  spaces"
PROMPT = "First Citizen:\n"


def export(config: ExportConfig) -> dict[str, Any]:
    """Run `llmk export`; returns the metrics (also in run.json)."""
    job = open_job(STAGE, config, config.model, [])
    if job is None:
        return finished_metrics(config.out)
    if is_quantized(job.source):
        raise InputError(
            f"{job.source} is quantized with llmk's own layout; export its floating-point source "
            "(gguf: --dtype q8_0 or q4_0 quantizes for llama.cpp)"
        )
    tokenizer = load_tokenizer_for(job.source)
    with staging_folder(job.out) as stage:
        if config.format == "safetensors":
            document = _safetensors(job.source, job.kind, tokenizer, stage, config.dtype)
        elif config.format == "onnx":
            document = _onnx(job.source, job.kind, tokenizer, stage, config.check)
        else:
            document = _gguf(job.source, job.kind, tokenizer, stage, config)
        document["bytes_on_disk"] = {"source": folder_bytes(job.source), "result": folder_bytes(stage)}
        metrics = {k: v for k, v in document.get("check", {}).items() if isinstance(v, int | float | bool)}
        job.finish(stage, {"format": config.format, "dtype": config.dtype, **document}, metrics)
    print(f"{config.format} export, compress.json and run.json written to {job.out}")
    return metrics


def _safetensors(source: Path, kind: str, tokenizer, stage: Path, dtype: str) -> dict[str, Any]:
    model = load_model(source, kind).to(TORCH_DTYPES[dtype])
    model.save_pretrained(stage, safe_serialization=True)
    tokenizer.save_pretrained(stage)
    return {"files": sorted(p.name for p in stage.iterdir())}


def _onnx(source: Path, kind: str, tokenizer, stage: Path, run_check: bool) -> dict[str, Any]:
    try:
        from llmkernel.compress.onnx import check_onnx, export_onnx
    except ImportError as error:
        raise MissingExtraError(
            f"ONNX export needs the onnx extra ({error.name}): pip install 'llmkernel[onnx]'"
        ) from None
    if kind not in ("classifier", "token_classifier", "encoder", "decoder", "masked_lm"):
        raise InputError(
            f"{source}: a {kind} model; ONNX export takes encoders, classifiers, NER models and decoders"
        )
    model = load_model(source, kind).eval()
    file = stage / "model.onnx"
    try:
        export_onnx(model, tokenizer, file, kind=kind)
    except InputError:
        raise
    except ValueError as error:
        raise InputError(f"{source}: {error}") from None
    tokenizer.save_pretrained(stage)
    model.config.save_pretrained(stage)
    document: dict[str, Any] = {"files": sorted(p.name for p in stage.iterdir())}
    if run_check:
        check = check_onnx(model, file, vocab_size=model.config.vocab_size)
        check["within_limit"] = check["max_abs_diff"] <= ONNX_LIMIT
        document["check"] = check
        print(
            f"onnxruntime vs PyTorch: largest absolute difference {check['max_abs_diff']:.2e} "
            f"(limit {ONNX_LIMIT:.0e}) over shapes {check['shapes']}"
        )
        if not check["within_limit"]:
            print(f"check missed: the difference is above {ONNX_LIMIT:.0e}")
    return document


def _gguf(source: Path, kind: str, tokenizer, stage: Path, config: ExportConfig) -> dict[str, Any]:
    from llmkernel.compress.gguf import check_gguf, export_gguf

    if kind != "decoder":
        raise InputError(
            f"{source}: a {kind} model; GGUF export takes Llama-style decoders (llama.cpp runs decoders)"
        )
    file = stage / f"{source.name}-{config.dtype}.gguf"
    try:
        summary = export_gguf(source, file, dtype=config.dtype)
    except InputError:
        raise
    except ValueError as error:
        raise InputError(f"{source}: {error}") from None
    document: dict[str, Any] = {"summary": summary, "files": [file.name]}
    if config.check:
        try:
            check = check_gguf(
                source, file, sample_text=config.sample_text or SAMPLE_TEXT, prompt=config.prompt or PROMPT
            )
        except ImportError:
            raise MissingExtraError(
                "checking a GGUF file needs llama.cpp: pip install 'llmkernel[llamacpp]' (or --check false)"
            ) from None
        document["check"] = check
        print(
            f"llama.cpp: tokenization {'equal' if check['tokens_equal'] else 'DIFFERENT'}, greedy generation "
            f"{'equal' if check['generation_equal'] else 'different from token ' + str(check.get('first_difference'))}"
        )
    return document
