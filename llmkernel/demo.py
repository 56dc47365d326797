"""`llmk demo`: the whole lifecycle on the documentation every CPython ships, with no download.

Prepare the corpus (pydoc topic pages and standard-library docstrings) and train a tokenizer; pretrain a
tiny decoder on it; fine-tune it as a classifier on a labeled task derived from the same corpus (which part
of the Python Library Reference a docstring comes from: text processing, data types, numbers, files,
internet, the operating system or the Python runtime); evaluate it clean and under a typo attack; prune and
quantize it; export it to ONNX (checked with onnxruntime); serve it and query it once over HTTP; write the
report. It is `llmk run` on the embedded recipe below (recipes/demo.yaml is the same, kept equal by a test),
and it ends by saying where everything is and what to try next.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

from llmkernel.pipeline import Options, Step, run_stages, stopped
from llmkernel.runs import atomic_write_text

# The labeled task: the chapter (grouped) of the Library Reference that documents each demo module.
LIBRARY_CHAPTERS: dict[str, tuple[str, ...]] = {
    "text": ("re", "string", "textwrap", "difflib", "codecs", "html.parser", "locale", "gettext", "shlex"),
    "datatypes": (
        "collections",
        "heapq",
        "bisect",
        "array",
        "enum",
        "dataclasses",
        "copy",
        "weakref",
        "pprint",
        "datetime",
        "calendar",
        "queue",
    ),
    "numeric": ("math", "decimal", "fractions", "statistics", "random", "itertools", "functools", "operator"),
    "files": (
        "pathlib",
        "shutil",
        "glob",
        "fnmatch",
        "tempfile",
        "zipfile",
        "tarfile",
        "gzip",
        "zlib",
        "io",
        "csv",
        "pickle",
        "sqlite3",
        "struct",
    ),
    "internet": (
        "socket",
        "http.client",
        "urllib.parse",
        "ipaddress",
        "email.message",
        "mimetypes",
        "json",
        "base64",
        "xml.etree.ElementTree",
        "uuid",
        "hashlib",
        "hmac",
        "secrets",
    ),
    "system": ("threading", "asyncio", "subprocess", "sched", "platform", "time", "logging", "argparse"),
    "runtime": ("ast", "dis", "inspect", "typing", "abc", "traceback", "warnings", "contextlib", "unittest"),
}
TEST_SHARE = 0.2  # of each chapter's docstrings, chosen by a hash of the qualified name (stable across runs)
MAX_CHARS = 600  # a docstring's first characters: the summary and the first paragraphs

# The embedded demo; recipes/demo.yaml holds the same recipe (a test keeps them equal).
DEMO_RECIPE: dict[str, Any] = {
    "prepare": {
        "inputs": ["builtin:python-docs"],
        "out": "runs/demo/data",
        "tokenizer": {"kind": "bpe", "vocab_size": 4096},
        "pack": {"val_fraction": 0.05},
    },
    "pretrain": {
        "out": "runs/demo/model",
        "objective": "clm",
        "model": {"size": "tiny", "layers": 3, "width": 192, "heads": 6, "kv_heads": 2},
        "train": {
            "batch_size": 16,
            "seq_len": 128,
            "max_steps": 500,
            "eval_every": 250,
            "checkpoint_every": 250,
        },
        "optim": {"lr": 0.003, "warmup_steps": 30},
    },
    "finetune": {
        "task": "classify",
        "data": {"train": "runs/demo/task/train.jsonl", "eval": "runs/demo/task/test.jsonl"},
        "out": "runs/demo/classifier",
        "epochs": 8,
        "optim": {"lr": 0.001},
    },
    "evaluate": {"attack": "typo", "attack_rate": 0.1, "out": "runs/demo/eval"},
    "prune": {"method": "structured", "ffn": 0.25, "out": "runs/demo/pruned"},
    "quantize": {"mode": "int8", "out": "runs/demo/quantized"},
    "export": {"format": "onnx", "out": "runs/demo/onnx"},
    "serve": {},
}


def chapter_of(module: str) -> str | None:
    return next((chapter for chapter, modules in LIBRARY_CHAPTERS.items() if module in modules), None)


def write_task(folder: Path) -> dict[str, int]:
    """The labeled task as train.jsonl / test.jsonl (text, label) in `folder`; returns the row counts.

    Files are rewritten only when their content changes, so the fine-tuning stage sees unchanged inputs
    (and skips) on a second run.
    """
    from llmkernel.data.readers import DEMO_MODULES, stdlib_docstrings

    splits: dict[str, list[str]] = {"train": [], "test": []}
    for module in DEMO_MODULES:
        chapter = chapter_of(module)
        if chapter is None:
            continue
        try:
            docstrings = list(stdlib_docstrings(module, methods=True))
        except ImportError:  # a Python built without this module
            continue
        for qualname, doc in docstrings:
            digest = int(hashlib.sha256(qualname.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            split = "test" if digest < TEST_SHARE else "train"
            splits[split].append(json.dumps({"text": doc[:MAX_CHARS], "label": chapter, "id": qualname}))
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        path, text = folder / f"{split}.jsonl", "\n".join(rows) + "\n"
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)
    return {split: len(rows) for split, rows in splits.items()}


def demo_recipe(out: str | Path) -> dict[str, Any]:
    """The demo recipe with its outputs under `out`."""
    recipe = copy.deepcopy(DEMO_RECIPE)
    for section in recipe.values():
        if "out" in section:
            section["out"] = str(Path(out) / Path(section["out"]).name)
    task = Path(out) / "task"
    recipe["finetune"]["data"] = {"train": str(task / "train.jsonl"), "eval": str(task / "test.jsonl")}
    return recipe


def run_demo(out: str | Path = "runs/demo", force: bool = False) -> list[Step]:
    """The whole chain on the embedded corpus, then where everything is and the next commands to try."""
    out = Path(out)
    counts = write_task(out / "task")
    print(
        "LLM Kernel demo, on the documentation that ships with this Python (no download):\n"
        "prepare -> pretrain a tiny decoder -> fine-tune it to tell which part of the Library Reference a\n"
        f"docstring comes from ({counts['train']:,} train / {counts['test']:,} test docstrings, "
        f"{len(LIBRARY_CHAPTERS)} labels) -> evaluate (clean and under typos) -> prune -> quantize -> export\n"
        "-> serve and query it -> report. A second run skips every stage whose inputs did not change.\n"
    )
    steps = run_stages(
        demo_recipe(out), Options(force=force, title="llmk demo: CPython's documentation, end to end")
    )
    if not any(stopped(step.metrics) for step in steps):
        explain(out, {step.name: step for step in steps})
    return steps


def explain(out: Path, steps: dict[str, Step]) -> None:
    """Where each output is, a figure from each, and the next commands to try."""
    from llmkernel.runs import read_manifest

    def metrics(name: str) -> dict[str, Any]:
        manifest = read_manifest(steps[name].out) or {}
        return manifest.get("metrics") or steps[name].metrics or {}

    nan = float("nan")
    stats = json.loads((out / "data" / "stats.json").read_text())
    model, tuned, evaluated = metrics("pretrain"), metrics("finetune"), metrics("evaluate")
    report = json.loads((out / "eval" / "eval.json").read_text())
    attacked = (report.get("attack") or {}).get("accuracy", nan)
    served = steps["serve"].metrics.get("routes", {})
    route, answer = next(iter(served.items()), ("", {}))
    print(f"""
What the demo wrote under {out}/:
  data/        {stats["output"]["documents"]:,} clean documents, a {stats.get("tokenizer", {}).get("vocab_size", 4096):,}-token BPE tokenizer, \
{sum(stats["tokens"].values()):,} tokens of shards
  model/       the pretrained decoder: {model.get("parameters", 0) / 1e6:.2f}M parameters, validation loss \
{model.get("val_loss", nan):.3f} ({model.get("val_bits_per_byte", nan):.2f} bits per byte) after {model.get("step", "?")} steps
  task/        the labeled docstrings: train.jsonl, test.jsonl
  classifier/  fine-tuned from model/: accuracy {tuned.get("eval_accuracy", nan):.3f} on the test docstrings \
({len(LIBRARY_CHAPTERS)} labels; a majority guess would score {_majority(out):.3f})
  eval/        accuracy {evaluated.get("accuracy", nan):.3f} clean, {attacked:.3f} with 10% of words typo-attacked; \
confusion_matrix.png
  pruned/      {_compressed(metrics("prune"))}
  quantized/   int8 weights and activations: {_compressed(metrics("quantize"))}
  onnx/        model.onnx (from pruned/), checked against PyTorch with onnxruntime
  report/      report.html (self-contained) and report.md over every folder above
  served       quantized/ over HTTP: POST {route} -> {answer.get("answer", "?")}

Next:
  open {out}/report/report.html
  llmk serve {out}/quantized --port 8000      # then open http://127.0.0.1:8000/ for the page
  tensorboard --logdir {out}/model/tb
  llmk demo --out {out}                       # again: every stage is up to date and skips""")


def _majority(out: Path) -> float:
    """Accuracy of always answering the most frequent test label (what the classifier must beat)."""
    labels = [json.loads(line)["label"] for line in (out / "task" / "test.jsonl").read_text().splitlines()]
    return max(labels.count(label) for label in set(labels)) / max(len(labels), 1)


def _compressed(metrics: dict[str, Any]) -> str:
    nan = float("nan")
    return (
        f"{metrics.get('bytes_ratio', nan):.0%} of the bytes, {metrics.get('speedup', nan):.2f}x the speed, "
        f"accuracy {-metrics.get('metric_drop', nan):+.2f} points vs its source"
    )
