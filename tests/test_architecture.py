"""The package's layers import one way, as docs/architecture.md states."""

from __future__ import annotations

import ast
from pathlib import Path

import napari_unifuse

PACKAGE = Path(napari_unifuse.__file__).parent
# Layer -> the layers it may import (besides itself and the package's own __version__).
ALLOWED = {
    "errors": set(),
    "classes": set(),
    "json_records": set(),
    "io": {"errors", "json_records"},
    "metrics": {"errors", "json_records"},
    "model": {"errors", "json_records", "classes"},
    "data": {"errors", "json_records", "classes", "io"},
    "engine": {"errors", "json_records", "classes", "io", "data", "model", "metrics"},
    "training": {"errors", "json_records", "classes", "io", "data", "model", "engine", "metrics"},
    "_napari_io": {"errors", "json_records", "io"},
    "_qt": {"errors", "json_records", "classes", "io", "data", "model", "engine", "metrics", "_napari_io"},
    "benchmark": {"errors", "json_records", "classes", "io", "data", "model", "engine", "metrics"},
    "cli": {"errors", "json_records", "classes", "io", "data", "model", "engine", "metrics", "training", "benchmark"},
}


def imported_layers(path: Path) -> set[str]:
    """The package layers a source file imports (``from napari_unifuse import benchmark`` counts as
    the ``benchmark`` layer; ``__version__`` as none)."""
    layers = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "napari_unifuse":
            parts = node.module.split(".")
            layers |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names} - {"__version__"}
        elif isinstance(node, ast.Import):
            layers |= {alias.name.split(".")[1] for alias in node.names
                       if alias.name.startswith("napari_unifuse.")}
    return layers


def layer_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


SOURCES = sorted(path for path in PACKAGE.rglob("*.py") if layer_of(path) != "__init__")


def test_every_layer_is_in_the_table():
    assert {layer_of(path) for path in SOURCES} == set(ALLOWED)


def test_every_module_imports_only_the_layers_below_its_own():
    violations = {str(path.relative_to(PACKAGE)): sorted(imported_layers(path) - {layer_of(path)}
                                                         - ALLOWED[layer_of(path)]) for path in SOURCES}
    assert {module: layers for module, layers in violations.items() if layers} == {}


def test_a_model_module_importing_data_is_caught(tmp_path):
    """The check itself: the import that made ``model`` load TorchIO and SimpleITK."""
    module = tmp_path / "ufrf.py"
    module.write_text("from napari_unifuse.data.degrade import DEGRADATION_CLASSES\n", encoding="utf-8")
    assert imported_layers(module) - {"model"} - ALLOWED["model"] == {"data"}
