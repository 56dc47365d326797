"""`llmk`: one subcommand per stage of `stages.py`, each built from that stage's config dataclass.

Every stage accepts `--config recipe.yaml` and `--section.field value` overrides; `llmk STAGE --help` lists
every field with its default. A stage's flags are added only when that stage is parsed or its help shown,
so `llmk --help` imports no stage (and no torch). A mistyped command, choice or flag prints that command's
usage and the closest valid spelling. User errors print one line and exit with code 2; Ctrl-C exits with
130 and leaves no half-written output.
"""

from __future__ import annotations

import argparse
import difflib
import os
import signal
import sys
from collections.abc import Iterable
from typing import Any

from llmkernel import __version__
from llmkernel.config import add_config_arguments, config_from_args
from llmkernel.errors import EXIT_USER_ERROR, UserError
from llmkernel.stages import STAGES, Stage


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """The suffix `; did you mean X?` naming the closest candidate to a misspelled `word` ("" if none is close)."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


class Parser(argparse.ArgumentParser):
    """argparse with suggestions, and a stage's flags added on first use (`stage`)."""

    def __init__(self, *args: Any, stage: Stage | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stage = stage
        self._config_added = stage is None

    def _add_config(self) -> None:
        if not self._config_added:
            self._config_added = True
            add_config_arguments(self, self.stage.config_class())

    def parse_known_args(
        self, args: list[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._add_config()
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self._subparsers is None:
            # Nothing parses after a leaf command: report its extras here, under its own usage (argparse
            # would hand them up and report them under `llmk`'s usage, naming no command).
            flag = next((e.split("=", 1)[0] for e in extras if e.startswith("--")), "")
            flags = [o for o in self._option_string_actions if o.startswith("--")]
            self.error(
                f"unrecognized arguments: {' '.join(extras)}{did_you_mean(flag, flags) if flag else ''}"
            )
        return namespace, extras

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        """An invalid command or choice names the closest one (`llmk pretrian`: did you mean pretrain?)."""
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(str, action.choices))
            suggestion = did_you_mean(value, map(str, action.choices)) if isinstance(value, str) else ""
            raise argparse.ArgumentError(
                action, f"invalid choice: {value!r} (choose from {choices}){suggestion}"
            )

    def format_usage(self) -> str:
        self._add_config()
        return super().format_usage()

    def format_help(self) -> str:
        self._add_config()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="llmk",
        description="LLM Kernel: raw text to a served, monitored and secured language model.",
        epilog="Run `llmk STAGE --help` for every option of a stage. `llmk demo` runs the embedded example.",
    )
    parser.add_argument("--version", action="version", version=f"llmk {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for stage in STAGES:
        sub = commands.add_parser(stage.name, help=stage.summary, description=stage.summary, stage=stage)
        sub.set_defaults(stage=stage)
    demo = commands.add_parser(
        "demo",
        help="the whole lifecycle on an embedded corpus (CPython's own docs), no download: prepare, pretrain, "
        "fine-tune, evaluate, prune, quantize, export, serve, report",
    )
    demo.add_argument("--out", default="runs/demo", help="folder for the demo's outputs")
    demo.add_argument("--force", action="store_true", help="run again even when the outputs are up to date")
    demo.set_defaults(stage=None, command="demo")
    recipe_stages = ", ".join(stage.name for stage in STAGES if stage.in_recipes)
    run = commands.add_parser("run", help="run the stages of a YAML recipe in order (e.g. recipes/demo.yaml)")
    run.add_argument(
        "recipe", help=f"YAML file with one section per stage, run in this order: {recipe_stages}"
    )
    run.add_argument(
        "--force", action="store_true", help="run every stage even when its outputs are up to date"
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue a training stage that was stopped, from its checkpoint",
    )
    run.add_argument("--from", dest="start", metavar="STAGE", default="", help="first stage to run")
    run.add_argument("--until", metavar="STAGE", default="", help="last stage to run")
    run.add_argument(
        "--out",
        metavar="DIR",
        default="",
        help="put every stage's folder under this one (named by its section's out, or by the stage)",
    )
    run.add_argument(
        "--serve-forever", action="store_true", help="a serve section keeps serving instead of check and stop"
    )
    run.add_argument("--no-report", action="store_true", help="do not write the report at the end")
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
            from llmkernel.demo import run_demo

            run_demo(args.out, force=args.force)
        elif args.command == "run":
            from llmkernel.pipeline import Options, run_recipe

            options = Options(
                force=args.force,
                resume=args.resume,
                start=args.start,
                until=args.until,
                out=args.out,
                serve_forever=args.serve_forever,
                report=not args.no_report,
            )
            run_recipe(args.recipe, options)
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
