"""How the code is laid out (docs/architecture.md): small functions, modules of about 600
lines, and imports that only go down the layers."""

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "bonsai_mlx"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 650  # "about 600"
# Layers, bottom up, as docs/architecture.md draws them; a module imports only from its own
# layer or a lower one.
LAYERS = [
    {"errors", "_blas", "_malloc", "weights", "checks", "arrays", "bonsai_mlx"},
    {"kernels"},
    {"quant"},
    {"models"},
    {"request", "images", "inpaint", "scheduler", "layout"},
    {"pipeline", "saving", "lora", "memory", "distributed", "preview"},
    {"cli", "info", "outputs", "convert", "bench", "doctor", "serve"},
]


def _code_stats():
    spec = importlib.util.spec_from_file_location("code_stats", ROOT / "scripts/code_stats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _layer(module: str) -> int:
    """The layer of a dotted module name (`bonsai_mlx.models.vae` -> models)."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else parts[0]
    for i, names in enumerate(LAYERS):
        if name in names:
            return i
    pytest.fail(f"bonsai_mlx.{name} is in no layer: add it to LAYERS here and to the drawing "
                "in docs/architecture.md")


def _imports(path: Path):
    """Every bonsai_mlx module `path` imports, at the top or inside a function."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bonsai_mlx"):
            if node.module == "bonsai_mlx":  # from bonsai_mlx import lora, __version__
                yield from (f"bonsai_mlx.{a.name}" for a in node.names
                            if not a.name.startswith("__"))
            else:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("bonsai_mlx."))


def _dotted(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] in ("__init__", "__main__") else parts)


def test_no_function_is_longer_than_60_lines():
    stats = _code_stats()
    long = [f"{p.relative_to(ROOT)}::{name} ({n} lines)" for p in _modules()
            for name, n in stats.function_lengths(p) if n > MAX_FUNCTION_LINES]
    assert not long, long


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_are_about_600_lines_at_most(path):
    assert len(path.read_text(encoding="utf-8").splitlines()) <= MAX_MODULE_LINES


def test_imports_only_go_down_the_layers():
    upward = []
    for path in _modules():
        if path.name == "__main__.py" or path == PACKAGE / "__init__.py":
            continue  # entry points: `python -m` runs the CLI, the package offers Pipeline
        here = _dotted(path)
        upward += [f"{here} -> {target}" for target in _imports(path)
                   if _layer(target) > _layer(here)]
    assert not upward, upward
