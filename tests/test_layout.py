"""The house rules of DESIGN.md, checked on the tree: one-way imports between stages, no import cycles, no
file over 600 lines, and a README file map with one line per file."""

from __future__ import annotations

import ast
import re

from tests.conftest import REPO

STAGES = {"data", "train", "eval", "compress", "retrieval", "serve", "report"}
ALLOWED = {("compress", "train"), ("serve", "retrieval")}  # the one-way edges DESIGN.md names
BASE = {"llmkernel.config", "llmkernel.errors", "llmkernel.runs", "llmkernel.runtime", "llmkernel.dist"}


def _modules() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports (anywhere in the file)."""
    files = {
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
        for path in (REPO / "llmkernel").rglob("*.py")
    }
    imports = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        imports[name] = {d for d in found if d in files and d != name}
    return imports


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def test_stage_packages_import_each_other_only_along_the_named_edges():
    crossing = sorted(
        f"{m} -> {d}"
        for m, deps in _modules().items()
        for d in deps
        if _stage(m) and _stage(d) and _stage(m) != _stage(d) and (_stage(m), _stage(d)) not in ALLOWED
    )
    assert crossing == []


def test_shared_layers_import_no_stage_and_nothing_imports_the_cli():
    modules = _modules()
    shared = [m for m in modules if m.split(".")[1:2] in (["tasks"], ["io"], ["models"]) or m in BASE]
    assert sorted(f"{m} -> {d}" for m in shared for d in modules[m] if _stage(d)) == []
    importers = {"llmkernel.cli", "llmkernel.pipeline", "llmkernel.demo", "llmkernel.stages"}
    assert (
        sorted(
            m
            for m, deps in modules.items()
            if deps & {"llmkernel.cli", "llmkernel.pipeline"} and m not in importers
        )
        == []
    )


def test_no_two_modules_import_each_other():
    modules = _modules()
    assert (
        sorted({" <-> ".join(sorted((a, b))) for a, deps in modules.items() for b in deps if a in modules[b]})
        == []
    )


def test_no_file_over_600_lines():
    long = [
        f"{path.relative_to(REPO)}: {count}"
        for path in (
            *(REPO / "llmkernel").rglob("*.py"),
            *(REPO / "tests").rglob("*.py"),
            *(REPO / "bench").glob("*.py"),
        )
        if (count := len(path.read_text().splitlines())) > 600
    ]
    assert long == []


def test_the_readme_file_map_lists_every_module_once():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## File map") :]
    listed = re.findall(r"^\| `(llmkernel/[^`]+\.py)` \|", table, flags=re.M)
    assert len(listed) == len(set(listed)), "a file is listed twice"
    modules = {
        str(path.relative_to(REPO))
        for path in (REPO / "llmkernel").rglob("*.py")
        if path.name != "__init__.py" or path.parent.name == "tasks"  # the task registry lives there
    }
    assert sorted(modules - set(listed)) == [], "files missing from the README's file map"
    assert sorted(set(listed) - modules) == [], "the file map lists files that do not exist"
