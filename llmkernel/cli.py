"""`llmk`: one subcommand per stage, each built from that stage's config dataclass.

Every stage accepts `--config recipe.yaml` and `--section.field value` overrides; `llmk STAGE --help` lists
every field with its default. User errors print one line and exit with code 2; Ctrl-C exits with 130
and leaves no half-written output.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmkernel import __version__
from llmkernel.config import add_config_arguments, config_from_args
from llmkernel.errors import EXIT_USER_ERROR, UserError


@dataclass
class Stage:
    name: str
    summary: str
    config_class: Callable[[], type]  # imported lazily so `llmk --help` stays fast
    run: Callable[[Any], Any]


def _prepare_config() -> type:
    from llmkernel.data.config import PrepareConfig

    return PrepareConfig


def _run_prepare(config: Any) -> None:
    from llmkernel.data.pipeline import prepare

    return prepare(config)


def _pretrain_config() -> type:
    from llmkernel.train.config import PretrainConfig

    return PretrainConfig


def _run_pretrain(config: Any) -> None:
    from llmkernel.train.pretrain import pretrain

    return pretrain(config)


def _serve_config() -> type:
    from llmkernel.serve.config import ServeConfig

    return ServeConfig


def _run_serve(config: Any) -> None:
    from llmkernel.serve.server import serve

    serve(config)


def _finetune_config() -> type:
    from llmkernel.train.config import FinetuneConfig

    return FinetuneConfig


def _run_finetune(config: Any) -> None:
    from llmkernel.train.finetune import finetune

    return finetune(config)


def _evaluate_config() -> type:
    from llmkernel.eval.evaluate import EvaluateConfig

    return EvaluateConfig


def _run_evaluate(config: Any) -> None:
    from llmkernel.eval.evaluate import evaluate

    return evaluate(config)


STAGES = [
    Stage(
        "prepare",
        "raw files -> clean text, a trained tokenizer and train/val token shards",
        _prepare_config,
        _run_prepare,
    ),
    Stage(
        "serve",
        "serve a model folder over HTTP: OpenAI-compatible routes, API keys, rate limits, metrics",
        _serve_config,
        _run_serve,
    ),
    Stage(
        "pretrain",
        "token shards -> a decoder (clm) or an encoder (mlm), from scratch or continued",
        _pretrain_config,
        _run_pretrain,
    ),
    Stage(
        "finetune",
        "adapt a model to classify / ner / sft data: full, top_layers or LoRA, optionally adversarial",
        _finetune_config,
        _run_finetune,
    ),
    Stage(
        "evaluate",
        "metrics of a model on a data file (report, confusion matrix, entity F1, perplexity), clean and attacked",
        _evaluate_config,
        _run_evaluate,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmk",
        description="LLM Kernel: raw text to a served, monitored and secured language model.",
        epilog="Run `llmk STAGE --help` for every option of a stage. `llmk demo` runs the embedded example.",
    )
    parser.add_argument("--version", action="version", version=f"llmk {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for stage in STAGES:
        sub = commands.add_parser(stage.name, help=stage.summary, description=stage.summary)
        add_config_arguments(sub, stage.config_class())
        sub.set_defaults(stage=stage)
    demo = commands.add_parser(
        "demo", help="run the pipeline on an embedded corpus (CPython's own docs), no download"
    )
    demo.add_argument("--out", default="runs/demo", help="folder for the demo's outputs")
    demo.add_argument("--force", action="store_true", help="run again even when the outputs are up to date")
    demo.set_defaults(stage=None, command="demo")
    run = commands.add_parser("run", help="run the stages of a YAML recipe in order (e.g. recipes/demo.yaml)")
    run.add_argument("recipe", help="YAML file with one section per stage: prepare, ...")
    run.add_argument(
        "--force", action="store_true", help="run every stage even when its outputs are up to date"
    )
    run.set_defaults(stage=None, command="run")
    keys = commands.add_parser("keys", help="manage the API keys of `llmk serve --api-keys FILE`")
    keys_commands = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = keys_commands.add_parser("create", help="add a new key: printed once, only its hash is stored")
    create.add_argument(
        "--keys-file", required=True, help="JSON keys file to add the key to (created if missing)"
    )
    create.add_argument("--name", help="name of the key, shown in request logs (default: key-N)")
    keys.set_defaults(stage=None, command="keys")
    return parser


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM unwinds like Ctrl-C, so staging folders are removed and nothing half-written is left."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time
    parser = build_parser()
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.command is None:
            parser.print_help()
            return 0
        if args.command == "demo":
            from llmkernel.pipeline import run_demo

            run_demo(args.out, force=args.force)
        elif args.command == "run":
            from llmkernel.pipeline import run_recipe

            run_recipe(args.recipe, force=args.force)
        elif args.command == "keys":
            from llmkernel.serve.security import create_key

            key, entry = create_key(args.keys_file, args.name)
            print(key)
            print(
                f"key '{entry.name}' added to {args.keys_file}; it is shown only this once", file=sys.stderr
            )
        else:
            args.stage.run(config_from_args(args.stage.config_class(), args, args.stage.name))
    except UserError as error:
        print(f"llmk {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"llmk {args.command}: interrupted; partial outputs were removed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
