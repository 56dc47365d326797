"""Every recipe parses, the demo recipe matches the embedded one, and the README's commands parse."""

from __future__ import annotations

import re
import shlex

import pytest

from llmkernel.cli import build_parser
from llmkernel.config import config_from_args, load_yaml
from llmkernel.demo import DEMO_RECIPE
from llmkernel.pipeline import Options, plan
from llmkernel.stages import RECIPE_STAGES
from tests.conftest import REPO

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_recipe_parses(recipe):
    data = load_yaml(recipe)
    assert set(data) <= set(RECIPE_STAGES)
    steps = plan(data, Options(), base=recipe.parent)  # chained as `llmk run` chains them
    assert [step.name for step in steps] == [name for name in RECIPE_STAGES if name in data]


def test_demo_recipe_file_matches_embedded_recipe():
    assert load_yaml(REPO / "recipes" / "demo.yaml") == DEMO_RECIPE


def test_readme_commands_parse():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    commands = [
        line.split("#")[0].strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()
    ]
    llmk = [shlex.split(c)[1:] for c in commands if c.startswith("llmk ")]
    assert any(args[0] == "prepare" for args in llmk)
    parser = build_parser()
    for args in llmk:
        parsed = parser.parse_args(args)
        if getattr(parsed, "stage", None) is not None:
            config_from_args(parsed.stage.config_class(), parsed)
        elif parsed.command == "run":
            assert (REPO / parsed.recipe).is_file()
    assert "make demo" in readme and "make test" in readme
    assert (REPO / ".ci" / "run").read_text().strip().endswith("make test")
