"""``experiments`` imports only downwards (``experiments.LAYERS``): no package imports one that
sits above it, so the sweep, training, planner and figures can each be read from the bottom up."""

from __future__ import annotations

import ast
from pathlib import Path

import experiments

ROOT = Path(experiments.__file__).parent


def _imported_packages(path: Path, package: str) -> set[str]:
    """The ``experiments`` subpackages a module imports (relative or absolute imports)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            parts = (node.module or "").split(".")
            if parts[0] == "experiments" and len(parts) > 1:
                found.add(parts[1])
            continue
        # Relative: level 1 is the module's own package, level 2 the experiments package.
        base = [package] if package else []
        base = base[: max(0, len(base) - (node.level - 1))]
        parts = [*base, *(node.module.split(".") if node.module else [])]
        if parts:
            found.add(parts[0])
        elif node.level == 2 or not package:
            found.update(alias.name for alias in node.names)
    return found


def test_every_package_is_layered():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(experiments.LAYERS), "add the new package to experiments.LAYERS"


def test_experiments_imports_only_downwards():
    rank = {name: i for i, name in enumerate(experiments.LAYERS)}
    upward = []
    for name in experiments.LAYERS:
        for path in (ROOT / name).rglob("*.py"):
            for target in _imported_packages(path, name) & set(rank):
                if rank[target] > rank[name]:
                    upward.append(f"{path.relative_to(ROOT.parent)} imports experiments.{target}")
    assert not upward, "\n".join(upward)
