"""Config dataclasses as the one schema for CLI flags, YAML recipes and the saved run.json.

A stage declares a dataclass (sections are nested dataclasses) whose fields are made with `option(...)`.
From it come:

* the CLI: `--section.field VALUE` for every field, `--help` listing each with its help and default;
* YAML: `--config recipe.yaml` holds the same names, nested; CLI flags override the file;
* run.json: `to_dict(config)` is what gets saved, and `build(cls, that_dict)` loads it back.

Values are converted and checked where they enter (`build`), and dataclasses validate ranges in
`__post_init__` with `check(...)`, so every mistake becomes one `ConfigError` line naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from llmkernel.errors import ConfigError

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def option(
    default: Any = _MISSING,
    help: str = "",
    *,
    factory: Any = _MISSING,
    positional: bool = False,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A config field with its help text. `factory` builds mutable defaults (lists, sections); no default
    and no factory makes the field required. `choices` lists the values the CLI accepts (and suggests)."""
    metadata = {"help": help, "positional": positional, "choices": choices}
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check(condition: bool, name: str, message: str) -> None:
    """Raise a ConfigError naming field `name` when `condition` is false (use in __post_init__)."""
    if not condition:
        raise ConfigError(f"{name}: {message}")


# ---------------------------------------------------------------------------------------------- types


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    inner, optional = _unwrap_optional(tp)
    if typing.get_origin(inner) is list:
        name = f"list of {_type_name(typing.get_args(inner)[0])}"
    elif dataclasses.is_dataclass(inner):
        name = "mapping"
    elif typing.get_origin(inner) in (typing.Union, types.UnionType):
        name = " or ".join(_type_name(a) for a in typing.get_args(inner))
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or null" if optional else name


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _convert(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML or CLI value to type `tp`, or raise a ConfigError naming `name`."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required (expected {_type_name(tp)})")
    if dataclasses.is_dataclass(inner):
        if isinstance(value, inner):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of fields, got {value!r}")
        return build(inner, value, prefix=f"{name}.")
    origin = typing.get_origin(inner)
    if origin is list:
        (item_type,) = typing.get_args(inner)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_convert(v, item_type, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):  # e.g. `str | InputSpec`: first type that takes it
        for candidate in typing.get_args(inner):
            try:
                return _convert(value, candidate, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r}")
    if inner is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in _TRUE:
            return True
        if str(value).lower() in _FALSE:
            return False
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if inner is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            number = float(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
        if not number.is_integer():
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return int(number)
    if inner is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if inner is str:
        if isinstance(value, dict | list):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    return value


def build(cls: type[T], data: dict[str, Any] | None = None, prefix: str = "") -> T:
    """Build dataclass `cls` from a (nested) dict, converting types and rejecting unknown keys."""
    data = dict(data or {})
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown field '{prefix}{unknown[0]}'; known fields{' of ' + prefix.rstrip('.') if prefix else ''}: "
            + ", ".join(sorted(fields))
        )
    kwargs = {}
    for name, value in data.items():
        section_defaults = _section_defaults(fields[name], hints[name])
        if section_defaults is not None and isinstance(value, dict):
            # A section given in part keeps the defaults of its field's factory (fine-tuning's optimizer
            # section has other defaults than pretraining's), not just those of the section class.
            value = {**section_defaults, **value}
        kwargs[name] = _convert(value, hints[name], prefix + name)
    for name, f in fields.items():
        if name not in kwargs and _required(f):
            choices = f.metadata.get("choices")
            raise ConfigError(
                f"{prefix}{name}: a value is required"
                + (f" (one of {', '.join(choices)})" if choices else "")
            )
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise ConfigError(f"{prefix}{error}") from None


def _required(f: dataclasses.Field) -> bool:
    return f.default is _MISSING and f.default_factory is _MISSING


def _section_defaults(f: dataclasses.Field, tp: Any) -> dict[str, Any] | None:
    """The field values of a section field's default instance, or None for a plain field."""
    inner, _ = _unwrap_optional(tp)
    if not dataclasses.is_dataclass(inner) or f.default_factory is _MISSING:
        return None
    return {k.name: getattr(f.default_factory(), k.name) for k in dataclasses.fields(inner) if k.init}


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (what run.json stores and `build` reads back)."""
    return dataclasses.asdict(config)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with one-line errors for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields at the top level")
    return data


# ------------------------------------------------------------------------------------------------ CLI


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    pass


class _Choices(tuple):
    """The choices of an optional positional. Python 3.11's argparse checks even an absent positional's
    default (SUPPRESS) against its choices (fixed in 3.12), so SUPPRESS counts as one."""

    def __contains__(self, value: object) -> bool:
        return value == argparse.SUPPRESS or super().__contains__(value)


def _walk(cls: type, prefix: str = "", instance: Any = None):
    """Yield (dotted name, field, type, section class, default) for every leaf field of `cls`, sections
    flattened. A section's defaults come from its field's factory (`instance`), else from its class."""
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner, _ = _unwrap_optional(tp)
        default = getattr(instance, f.name) if instance is not None else field_default(f)
        if dataclasses.is_dataclass(inner):
            yield from _walk(inner, f"{prefix}{f.name}.", default)
        else:
            yield prefix + f.name, f, tp, cls, default


def field_default(f: dataclasses.Field) -> Any:
    """The default of a dataclass field (its factory called), or None for a required field."""
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return None


def _escape(help_text: str) -> str:
    """argparse %-formats help strings: a literal "15%" would make --help crash."""
    return help_text.replace("%", "%%")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add `--config` and one flag per config field (dotted for sections, grouped by section) to `parser`.

    The usage line is short (positionals, `--config`, `--section.field VALUE ...`): a stage has dozens of
    flags, and an error should show its one line under the usage, not below forty lines of flags. A required
    positional (a field without a default) shows without brackets; it may still come from the `--config`
    file, so argparse itself treats it as optional and `config_from_args` reports it missing.
    """
    parser.formatter_class = _HelpFormatter
    parser.add_argument(
        "--config", metavar="YAML", help="YAML file with any of the fields below; flags override it"
    )
    usage = ["%(prog)s", "[-h]"]
    groups: dict[str, argparse._ArgumentGroup] = {}
    for dotted, f, tp, section, default in _walk(cls):
        help_text = f.metadata.get("help", "") or " "
        inner, _ = _unwrap_optional(tp)
        is_list = typing.get_origin(inner) is list
        choices = f.metadata.get("choices")
        if f.metadata.get("positional"):
            action = parser.add_argument(
                dotted,
                nargs="*" if is_list else "?",
                default=argparse.SUPPRESS,
                choices=_Choices(choices) if choices else None,
                help=_escape(f"{help_text}; required" if _required(f) else help_text),
            )
            name = "{" + ",".join(choices) + "}" if choices else action.dest
            usage.append(name if _required(f) else f"[{name} ...]" if is_list else f"[{name}]")
            continue
        group_name = dotted.rpartition(".")[0]
        if group_name and group_name not in groups:
            doc = (section.__doc__ or "").strip().splitlines()[0]
            groups[group_name] = parser.add_argument_group(f"{group_name}", doc)
        target = groups.get(group_name, parser)
        kwargs: dict[str, Any] = {
            "dest": dotted,
            "default": argparse.SUPPRESS,
            "help": _escape(help_text if "default:" in help_text else f"{help_text} (default: {default!r})"),
            "metavar": "VALUE" if is_list else getattr(inner, "__name__", "VALUE").upper(),
        }
        if inner is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        elif is_list:
            kwargs.update(nargs="*")
        elif choices:
            kwargs.update(choices=choices, metavar="{" + ",".join(choices) + "}")
        names = [f"--{dotted}"]
        if "_" in dotted:  # --api-keys and --api_keys both work
            names.append(f"--{dotted.replace('_', '-')}")
        target.add_argument(*names, **kwargs)
    parser.usage = " ".join([*usage, "[--config YAML]", "[--section.field VALUE ...]"])


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, leaf = dotted.split(".")
    node = data
    for section in sections:
        child = node.get(section)
        if not isinstance(child, dict):
            child = node[section] = {}
        node = child
    node[leaf] = value


def config_from_args(cls: type[T], args: argparse.Namespace, stage: str | None = None) -> T:
    """Resolve a config: dataclass defaults, then the `--config` YAML, then explicit CLI flags.

    A multi-stage recipe (one section per stage, what `llmk run` reads) gives `stage` its own section, so
    `llmk pretrain --config recipes/shakespeare-gpt.yaml --train.max_steps 50` runs that recipe's pretraining.
    """
    values = vars(args)
    data = load_yaml(values["config"]) if values.get("config") else {}
    if stage and isinstance(data.get(stage), dict) and stage not in _field_types(cls):
        data = data[stage]
    for dotted, f, *_ in _walk(cls):
        if dotted in values:
            _set_dotted(data, dotted, values[dotted])
        elif f.metadata.get("positional") and _required(f) and dotted not in data:
            choices = f.metadata.get("choices")
            value = "|".join(choices) if choices else dotted.upper()
            command = f"llmk {stage} {value} ..." if stage else value
            raise ConfigError(f"{dotted}: required as the first argument: `{command}`")
    return build(cls, data)
