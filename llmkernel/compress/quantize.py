"""`llmk quantize`: a model folder in, a folder with integer Linear layers out, measured against the source.

Read top to bottom: check the inputs, load the source and measure it, quantize a second copy
(encoders: `models.int8`, int8 weights and int8 activations; decoders: `models.weight_only`, int8 or int4
weight groups, packed), save it (`models.quantized`), load the saved folder back as every stage will and
measure that, then check the quality gates and write compress.json and run.json.

Gates (printed, and in compress.json under "gates"; a missed gate is reported, never hidden):
encoders lose at most 1 point of the headline metric; decoders keep perplexity within 2% (int8) or 8%
(int4) of the source on the eval text, and their greedy-token agreement and largest logit error are
reported beside it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from llmkernel.compress.common import Job, calibration_batches, finished_metrics, open_job
from llmkernel.compress.config import QuantizeConfig
from llmkernel.compress.measure import agreement, compare, logit_error, measure, summary_line
from llmkernel.errors import InputError
from llmkernel.models.loading import load_model, load_tokenizer_for
from llmkernel.models.quantized import is_quantized, save_quantized
from llmkernel.runs import staging_folder
from llmkernel.runtime import configure_threads

STAGE = "quantize"
ENCODER_KINDS = ("classifier", "token_classifier", "encoder", "masked_lm")
PERPLEXITY_GATES = {"int8": 0.02, "int4": 0.08}  # largest relative perplexity increase (the issue's)
ACCURACY_GATE = 1.0  # points


def quantize(config: QuantizeConfig) -> dict[str, Any]:
    """Run `llmk quantize`; returns the metrics (also in run.json)."""
    job = open_job(STAGE, config, config.model, [config.measure.eval, config.calibration])
    if job is None:
        return finished_metrics(config.out)
    if is_quantized(job.source):
        raise InputError(f"{job.source} is already quantized; quantize its floating-point source folder")
    decoder = job.kind == "decoder"
    if not decoder and job.kind not in ENCODER_KINDS:
        raise InputError(
            f"{job.source}: a {job.kind} model; llmk quantize takes {', '.join(ENCODER_KINDS)} and decoder models"
        )
    if not decoder and config.mode == "int4":
        raise InputError(
            "mode: int4 is weight-only for decoders (memory-bound); encoders are compute-bound: use --mode int8"
        )
    if decoder and config.calibration:
        raise InputError("calibration: decoders are quantized weight-only, which needs no calibration file")
    configure_threads(config.threads, 1)
    torch.manual_seed(0)
    tokenizer = load_tokenizer_for(job.source)

    source = load_model(job.source, job.kind).eval()
    print(f"measuring the source model {job.source} ...")
    before = measure(source, tokenizer, job.kind, job.source, config.measure)
    model = copy.deepcopy(source)  # the copy to quantize; the source stays for the comparison
    spec = _quantize_in_place(model, tokenizer, job, config)

    with staging_folder(job.out) as stage:
        save_quantized(model, tokenizer, stage, spec)
        del model
        result = load_model(stage, job.kind).eval()  # measured as every stage will load it
        print(f"measuring the {config.mode} model ...")
        after = measure(result, tokenizer, job.kind, stage, config.measure)
        comparison = compare(job.kind, before, after)
        gates = _gates(config.mode, job.kind, comparison)
        if decoder:
            comparison["greedy_agreement"] = agreement(before["_generated"], after["_generated"])
            comparison.update(logit_error(source, result, source.config.vocab_size))
        document = {"method": {**spec, "modules": len(spec["modules"])}, "source": before, "result": after}
        job.finish(stage, {**document, "comparison": comparison, "gates": gates}, _metrics(comparison, after))
    print(summary_line(STAGE, comparison))
    for gate in gates:
        if not gate["passed"]:
            print(f"gate missed: {gate['name']} {gate['value']:.4g} (limit {gate['limit']:.4g})")
    print(f"quantized model, compress.json and run.json written to {job.out}")
    return _metrics(comparison, after)


def _quantize_in_place(model, tokenizer, job: Job, config: QuantizeConfig) -> dict[str, Any]:
    keep = set(config.keep)
    if job.kind == "decoder":
        from llmkernel.models.weight_only import quantize_weight_only

        bits = 8 if config.mode == "int8" else 4
        names = quantize_weight_only(
            model, bits=bits, group_size=config.group_size, skip=lambda name, _: name in keep
        )
        return {"method": "weight_only", "bits": bits, "group_size": config.group_size, "modules": names}
    from llmkernel.models.int8 import quantize_int8

    base = model.base_model_prefix

    def skip(name: str, _module) -> bool:  # default: the task head (outside the base model) stays fp32
        return name in keep if keep else not name.startswith(f"{base}.")

    batches = None
    if config.calibration:
        batches = calibration_batches(
            model, tokenizer, job.kind, config.calibration, config.calibration_samples
        )
    names = quantize_int8(model, calibration=batches, skip=skip)
    if not names:
        raise InputError(f"{job.source}: no Linear layer left to quantize (--keep names them all)")
    return {"method": "int8", "static": batches is not None, "modules": names}


def _gates(mode: str, kind: str, comparison: dict[str, Any]) -> list[dict[str, Any]]:
    if "metric_drop" not in comparison:
        return []
    limit = PERPLEXITY_GATES[mode] if kind == "decoder" else ACCURACY_GATE
    name = "perplexity increase" if kind == "decoder" else f"{comparison['metric']} points lost"
    value = comparison["metric_drop"]
    return [{"name": name, "value": value, "limit": limit, "passed": value <= limit}]


def _metrics(comparison: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in comparison.items() if isinstance(v, int | float)}
    flat.update({f"result_{k}": v for k, v in after["metrics"].items()})
    return flat
