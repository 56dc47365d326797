from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from llmkernel.config import add_config_arguments, build, check, config_from_args, option, to_dict
from llmkernel.errors import ConfigError


@dataclass
class Section:
    size: int = option(4, "a size")
    names: list[str] = option(help="names", factory=list)

    def __post_init__(self) -> None:
        check(self.size > 0, "size", "must be > 0")


@dataclass
class Example:
    inputs: list[str] = option(help="inputs", factory=list, positional=True)
    rate: float = option(0.5, "a rate")
    flag: bool = option(False, "a flag")
    label: str | None = option(None, "a label")
    section: Section = option(factory=Section)


def parse(argv: list[str]) -> Example:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Example)
    return config_from_args(Example, parser.parse_args(argv))


def test_defaults_and_dotted_overrides():
    config = parse(
        ["a.txt", "b.txt", "--rate", "0.25", "--section.size", "8", "--flag", "--section.names", "x", "y"]
    )
    assert config.inputs == ["a.txt", "b.txt"]
    assert config.rate == 0.25 and config.flag is True and config.label is None
    assert config.section == Section(size=8, names=["x", "y"])


def test_yaml_then_flags_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("inputs: [c.txt]\nrate: 0.1\nsection: {size: 2}\nlabel: hi\n")
    config = parse(["--config", str(recipe), "--section.size", "3"])
    assert config.inputs == ["c.txt"] and config.rate == 0.1 and config.label == "hi"
    assert config.section.size == 3


def test_a_multi_stage_recipe_gives_the_stage_its_section(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("prepare: {out: data}\nexample: {rate: 0.1, section: {size: 2}}\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Example)
    config = config_from_args(
        Example, parser.parse_args(["--config", str(recipe), "--rate", "0.2"]), "example"
    )
    assert config.rate == 0.2 and config.section.size == 2
    # without a section of its own, or where the stage has a field of that name, the file is read as it is
    for stage in ("other", "section"):
        with pytest.raises(ConfigError, match="unknown field '(example|prepare)'"):
            config_from_args(Example, parser.parse_args(["--config", str(recipe)]), stage)


def test_round_trip_through_dict():
    config = Example(inputs=["x"], section=Section(size=5, names=["n"]))
    assert build(Example, to_dict(config)) == config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"rate": "fast"}, "rate: expected a number"),
        ({"section": {"size": 0}}, "section.size: must be > 0"),
        ({"section": {"sise": 3}}, "unknown field 'section.sise'"),
        ({"colour": 1}, "unknown field 'colour'"),
        ({"flag": "maybe"}, "flag: expected true or false"),
        ({"section": {"size": 1.5}}, "section.size: expected an integer"),
    ],
)
def test_errors_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build(Example, data)


def test_bad_yaml_is_one_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("rate: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse(["--config", str(recipe)])
    with pytest.raises(ConfigError, match="config file not found"):
        parse(["--config", str(tmp_path / "missing.yaml")])


def test_every_stage_help_renders():
    """Help strings with a literal % ("80% [MASK]") once made `llmk pretrain --help` crash."""
    from llmkernel.cli import STAGES, build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for stage in STAGES:
        text = subparsers.choices[stage.name].format_help()
        assert "--" in text
    pretrain_help = subparsers.choices["pretrain"].format_help()
    assert "80% [MASK]" in pretrain_help and "6% of the steps" in pretrain_help
