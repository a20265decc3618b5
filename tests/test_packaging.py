"""The package declares what it imports: PIL and superqt arrived only through other packages'
dependencies, so a change there would have broken every PNG read or the workbench's sections."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _normalized(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _declared_distributions() -> set[str]:
    """Every distribution in the dependencies or an optional extra (an import guarded for an extra counts)."""
    with (REPO / "pyproject.toml").open("rb") as stream:
        project = tomllib.load(stream)["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {_normalized(re.match(r"[A-Za-z0-9._-]+", requirement).group()) for requirement in requirements}


def _third_party_imports() -> dict[str, str]:
    """Each top-level module the package imports from outside itself and the standard library, with a file importing it."""
    modules: dict[str, str] = {}
    for path in sorted((REPO / "napari_unifuse").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for top in {name.split(".")[0] for name in names} - set(sys.stdlib_module_names) - {"napari_unifuse"}:
                modules.setdefault(top, str(path.relative_to(REPO)))
    return modules


def test_every_third_party_import_is_a_declared_dependency():
    installed = importlib.metadata.packages_distributions()
    declared = _declared_distributions()
    # A module of an extra that is not installed here (mamba_ssm) is named as its distribution is.
    undeclared = {module: where for module, where in _third_party_imports().items()
                  if not {_normalized(d) for d in installed.get(module, [module])} & declared}
    assert undeclared == {}, f"imported but not declared in pyproject.toml: {undeclared}"
