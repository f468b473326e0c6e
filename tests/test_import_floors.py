"""The package's floors: every module imports only from its own floor or below.

Read statically (``ast``), so imports inside functions and under ``TYPE_CHECKING`` count
too: a lazy import that runs back up is still a cycle in the design. The floors are the
ones ``docs/architecture.md`` draws.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import livelm

PACKAGE_DIR = Path(livelm.__file__).resolve().parent

# Lowest first. A module's floor is that of its first package below ``livelm``; the
# top-level data modules (config, sampling params, public outputs) are pure Python and sit
# with core.
FLOORS: list[tuple[str, ...]] = [
    ("kernels",),
    ("quant", "core", "config", "sampling_params", "structured_output", "outputs"),
    ("layers",),
    ("models",),
    ("runner",),
    ("engine",),
    ("entrypoints", "bench", "sim", "serving", "__init__"),
]
FLOOR_OF = {name: level for level, names in enumerate(FLOORS) for name in names}
# Packages of one floor that still must not import each other.
APART = {("quant", "core"), ("core", "quant")}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts)


def _top(path: Path) -> str:
    """The first name below ``livelm`` (``__init__`` for the package's own __init__.py)."""
    rel = path.relative_to(PACKAGE_DIR)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _is_module(name: str) -> bool:
    return (PACKAGE_DIR / f"{name}.py").is_file() or (PACKAGE_DIR / name).is_dir()


def _livelm_imports(path: Path) -> list[tuple[int, str]]:
    """(line, first name below livelm) of each import of livelm in the file."""
    return _imports_in(path.read_text(), path.relative_to(PACKAGE_DIR).parts)


def _imports_in(source: str, rel_parts: tuple[str, ...]) -> list[tuple[int, str]]:
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = list(rel_parts[: len(rel_parts) - node.level])
                mod = ".".join(["livelm", *base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            names = [mod]
            if mod == "livelm":  # ``from livelm import x``: a module, or the public API
                names = [f"livelm.{a.name if _is_module(a.name) else '__init__'}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "livelm" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return sorted(found)


def test_every_package_has_a_floor():
    tops = {_top(p) for p in _modules()}
    assert tops - FLOOR_OF.keys() == set(), "a new package needs a floor in FLOORS (and in docs/architecture.md)"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
def test_imports_run_down_only(path: Path):
    here = _top(path)
    upward = [
        f"line {line}: livelm.{target} (floor {FLOOR_OF.get(target)}) from {here} (floor {FLOOR_OF[here]})"
        for line, target in _livelm_imports(path)
        if target != here and (FLOOR_OF.get(target, 99) > FLOOR_OF[here] or (here, target) in APART)
    ]
    assert upward == []


def test_the_checker_sees_every_import_form():
    # The rule is only worth something if it catches a violation in each form it may take.
    source = (
        "from livelm.engine.llm import LLM\n"
        "import livelm.runner.model_runner\n"
        "def f():\n    from livelm import entrypoints\n"
        "from ..models import loader\n"
        "from livelm import LLM, config\n"
    )
    assert _imports_in(source, ("kernels", "build.py")) == [
        (1, "engine"), (2, "runner"), (4, "entrypoints"), (5, "models"), (6, "__init__"), (6, "config"),
    ]
