"""Benchmark `llmk quantize`, `llmk prune` and `llmk distill`: each result against its source, in one run.

Classifier methods (on the SST-2 MiniLM classifier of recipes/sst2-classifier.yaml, dev accuracy on the
872 dev sentences; speed at batch 32, length 64, on 2 threads):

* `int8`: `llmk quantize` (int8 weights and activations);
* `structured`: `llmk prune --ffn F --layers L` with `--recover.steps N` (distillation from the source);
* `unstructured_50`: `llmk prune --method unstructured --sparsity 0.5` (Wanda) with the same recovery;
* `distill`: a 3-layer student (the source with 3 of its 6 layers dropped by `llmk prune --layers 3`)
  trained by `llmk distill` from the 6-layer source.

Decoder methods (SmolLM2-135M-Instruct; perplexity on the held-out last 10% of Tiny Shakespeare), each
beside llama.cpp (`llama-cpp-python`) on the same model exported by `llmk export --format gguf`:

* `decoder_int8`: `llmk quantize --mode int8` vs llama.cpp's Q8_0; `decoder_int4`: `--mode int4` vs Q4_0;
  single-stream greedy decode tokens/s of our serving engine vs llama.cpp's, with the same threads.

Speed is timed here, not taken from compress.json: the two sides of each ratio take turns for
`--rounds` rounds (the machine is shared), and the median ratio is reported with its range.
`metric_drop`: accuracy points lost (classifier), or the relative perplexity increase (decoders; 0.02 = 2%).
`bytes_ratio`: bytes of the result's weight files over the source's.

Prints one JSON line: {"int8": {...}, "structured": {...}, "unstructured_50": {...}, "distill": {...},
"decoder_int8": {...}, "decoder_int4": {...}}.
Usage: python bench/compress.py [--classifier runs/sst2/full] [--only int8,structured,...] [--rounds 7]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from llmkernel.compress.config import DistillConfig, PruneConfig, QuantizeConfig  # noqa: E402
from llmkernel.compress.distill import distill  # noqa: E402
from llmkernel.compress.measure import fixed_batch, folder_bytes  # noqa: E402
from llmkernel.compress.prune import prune  # noqa: E402
from llmkernel.compress.quantize import quantize  # noqa: E402
from llmkernel.config import build  # noqa: E402
from llmkernel.models.loading import load_model  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
SST2 = SHARED / "sst2"
METHODS = ("int8", "structured", "unstructured_50", "distill", "decoder_int8", "decoder_int4")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read(folder: Path) -> dict:
    return json.loads((folder / "compress.json").read_text())


def alternate(sides: dict[str, callable], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each side, the sides taking turns (the order flips every round)."""
    names = list(sides)
    for name in names:
        sides[name]()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            started = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - started)
    return times


def speedup(times: dict[str, list[float]], slow: str, fast: str) -> dict[str, float]:
    ratios = [s / f for s, f in zip(times[slow], times[fast])]
    return {"speedup": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)]}


def encoder_speed(source: Path, result: Path, rounds: int) -> dict[str, float]:
    torch.set_num_threads(2)
    models = {
        "source": load_model(source, "classifier").eval(),
        "result": load_model(result, "classifier").eval(),
    }
    batch = fixed_batch(models["source"].config.vocab_size, 32, 64, special=1000)

    def forward(model):
        def run():
            with torch.inference_mode():
                model(**batch)

        return run

    times = alternate({name: forward(model) for name, model in models.items()}, rounds)
    out = speedup(times, "source", "result")
    out["source_ms"] = 1000 * statistics.median(times["source"])
    out["result_ms"] = 1000 * statistics.median(times["result"])
    return out


def classifier_figures(source: Path, result: Path, rounds: int) -> dict:
    document = read(result)
    before, after = document["source"]["metrics"], document["result"]["metrics"]
    figures = {
        "source_accuracy": before["accuracy"],
        "accuracy": after["accuracy"],
        "metric_drop": 100 * (before["accuracy"] - after["accuracy"]),
        "bytes_ratio": folder_bytes(result) / folder_bytes(source),
        "linear_bytes_ratio": document["comparison"]["linear_bytes_ratio"],
        "nonzero_ratio": document["comparison"]["nonzero_ratio"],
    }
    figures.update(encoder_speed(source, result, rounds))
    return figures


def recovery(args) -> dict:
    return {
        "steps": args.recover_steps,
        "distill_weight": args.distill_weight,
        "optim": {"lr": args.lr},
        "data": {"train": str(SST2 / "train.tsv"), "eval": str(SST2 / "dev.tsv"), "limit": 8000},
        "train": {"batch_size": 32, "threads": 2},
    }


def measure_settings() -> dict:
    return {"eval": str(SST2 / "dev.tsv"), "repeats": 3}


def run_int8(args, work: Path) -> dict:
    out = work / "int8"
    quantize(
        build(
            QuantizeConfig,
            {"model": str(args.classifier), "out": str(out), "threads": 2, "measure": measure_settings()},
        )
    )
    return {
        "mode": "int8 weights + int8 activations (dynamic)",
        **classifier_figures(args.classifier, out, args.rounds),
    }


def run_structured(args, work: Path) -> dict:
    out = work / "structured"
    settings = {
        "model": str(args.classifier),
        "out": str(out),
        "ffn": args.ffn,
        "layers": args.layers,
        "calibration": str(SST2 / "train.tsv"),
        "threads": 2,
        "recover": recovery(args),
        "measure": measure_settings(),
    }
    prune(build(PruneConfig, settings))
    return {"ffn": args.ffn, "layers_dropped": args.layers, "recover_steps": args.recover_steps,
            **classifier_figures(args.classifier, out, args.rounds)}  # fmt: skip


def run_unstructured(args, work: Path) -> dict:
    out = work / "unstructured_50"
    settings = {
        "model": str(args.classifier),
        "out": str(out),
        "method": "unstructured",
        "sparsity": 0.5,
        "criterion": "wanda",
        "calibration": str(SST2 / "train.tsv"),
        "threads": 2,
        "recover": recovery(args),
        "measure": measure_settings(),
    }
    prune(build(PruneConfig, settings))
    return {"sparsity": 0.5, "criterion": "wanda", "recover_steps": args.recover_steps,
            **classifier_figures(args.classifier, out, args.rounds)}  # fmt: skip


def run_distill(args, work: Path) -> dict:
    student = work / "student-3-layers"
    prune(build(PruneConfig, {"model": str(args.classifier), "out": str(student), "layers": 3,
                              "calibration": str(SST2 / "train.tsv"), "threads": 2, "measure": {"repeats": 1}}))  # fmt: skip
    out = work / "distill"
    settings = {
        "task": "classify",
        "teacher": str(args.classifier),
        "student": str(student),
        "out": str(out),
        "epochs": args.distill_epochs,
        "data": {"train": str(SST2 / "train.tsv"), "eval": str(SST2 / "dev.tsv"), "limit": 8000},
        "train": {"batch_size": 32, "threads": 2},
        "optim": {"lr": args.lr},
        "distill_weight": args.distill_weight,
        "measure": measure_settings(),
        "force": True,
    }
    distill(build(DistillConfig, settings))
    return {
        "student_layers": 3,
        "epochs": args.distill_epochs,
        **classifier_figures(args.classifier, out, args.rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classifier", type=Path, default=REPO / "runs" / "sst2" / "full")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-compress")
    parser.add_argument("--only", default=",".join(METHODS), help="comma-separated methods to run")
    parser.add_argument("--rounds", type=int, default=7, help="alternating timing rounds per ratio")
    parser.add_argument("--ffn", type=float, default=0.5, help="structured: share of FFN neurons removed")
    parser.add_argument("--layers", type=int, default=1, help="structured: layers dropped")
    parser.add_argument(
        "--recover_steps", type=int, default=750, help="recovery steps after pruning (3 epochs of 8,000)"
    )
    parser.add_argument("--distill_epochs", type=float, default=3.0, help="distill: epochs over 8,000 rows")
    parser.add_argument("--distill_weight", type=float, default=0.5, help="recovery and distill: KL weight")
    parser.add_argument(
        "--lr", type=float, default=0.0, help="recovery and distill: peak lr (0: the default)"
    )
    parser.add_argument("--decoder_group_size", type=int, default=32, help="decoder int4: group size")
    parser.add_argument("--decode_tokens", type=int, default=64, help="decoders: tokens per timed generation")
    args = parser.parse_args()
    only = [m for m in args.only.split(",") if m]
    if any(m in METHODS[:4] for m in only) and not (args.classifier / "config.json").is_file():
        sys.exit(f"{args.classifier}: no classifier; run `llmk run recipes/sst2-classifier.yaml` first")
    args.work.mkdir(parents=True, exist_ok=True)
    runners = {"int8": run_int8, "structured": run_structured, "unstructured_50": run_unstructured,
               "distill": run_distill}  # fmt: skip
    try:
        from decoders import run_decoder  # bench/decoders.py: the decoder half, beside llama.cpp
    except ImportError:
        from bench.decoders import run_decoder
    runners["decoder_int8"] = lambda a, w: run_decoder(a, w, "int8")
    runners["decoder_int4"] = lambda a, w: run_decoder(a, w, "int4")
    results = {}
    for method in only:
        log(f"--- {method}")
        started = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # the commands' own lines; stdout is the JSON line
            results[method] = runners[method](args, args.work)
        results[method]["wall_s"] = time.perf_counter() - started
        log(json.dumps({method: results[method]}))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
