"""The floors of the house (ARCHITECTURE.md): nothing imports upward, no two floors import each other, segprune's
own imports sit at module top, and the engine loads without the model zoo."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import segprune

ROOT = Path(segprune.__file__).parent
BOTTOM = {"_utils"}
# floor -> the floors it may import (the library's floors; workflows above them; the CLI on top)
ALLOWED = {
    "_utils": set(),
    "data": BOTTOM,
    "models": BOTTOM,
    "prune": BOTTOM,
    "checkpoint": BOTTOM | {"models", "prune"},
    "export": BOTTOM | {"prune"},
    "eval": BOTTOM | {"data", "models", "prune", "export", "checkpoint"},
    "train": BOTTOM | {"data", "prune", "checkpoint"},
    "report": BOTTOM | {"data", "eval"},
    "__init__": BOTTOM | {"prune", "eval", "checkpoint"},
    "workflows": BOTTOM | {"data", "models", "prune", "checkpoint", "export", "eval", "train", "report"},
    "cli": BOTTOM | {"data", "models", "prune", "checkpoint", "export", "eval", "train", "report", "workflows"},
}


def floor_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def segprune_imports(tree: ast.AST):
    """(node, imported module) for every import of segprune in the file."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node, a.name) for a in node.names if a.name.split(".")[0] == "segprune")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "segprune":
            if node.module == "segprune":  # from segprune import checkpoint: the module named
                yield from ((node, f"segprune.{a.name}") for a in node.names)
            else:
                yield node, node.module


def edges():
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        inner = {id(sub) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for sub in ast.walk(fn)}
        for node, target in segprune_imports(tree):
            yield module_name(path), target, node.lineno, id(node) in inner


def test_every_floor_is_known():
    floors = {floor_of(module_name(p)) for p in ROOT.rglob("*.py")}
    assert floors <= set(ALLOWED), f"floors without a rule: {floors - set(ALLOWED)}"


def test_nothing_imports_upward_or_sideways():
    bad = []
    for source, target, line, _ in edges():
        a, b = floor_of(source), floor_of(target)
        if b == "__init__" and target == "segprune":
            b = "__init__"
        if a != b and b not in ALLOWED[a]:
            bad.append(f"{source}:{line} imports {target} ({a} may import {sorted(ALLOWED[a]) or 'nothing'})")
    assert not bad, "\n".join(bad)


def test_the_floors_form_no_cycle():
    seen, done = set(), set()

    def visit(floor, path):
        assert floor not in seen or floor in done, f"cycle: {' -> '.join(path + [floor])}"
        if floor in done:
            return
        seen.add(floor)
        for below in ALLOWED[floor]:
            visit(below, path + [floor])
        done.add(floor)

    for floor in ALLOWED:
        visit(floor, [])


def test_segprune_imports_sit_at_module_top():
    inner = [f"{source}:{line} imports {target} inside a function" for source, target, line, nested in edges()
             if nested]
    assert not inner, "\n".join(inner)


@pytest.mark.parametrize("package, absent", [("segprune.prune", "segprune.models"),
                                             ("segprune.prune", "segprune.eval"),
                                             ("segprune.prune", "matplotlib"),
                                             ("segprune.data", "segprune.models")])
def test_a_floor_loads_without_those_above_it(package, absent):
    code = f"import sys, {package}; print(any(m == {absent!r} or m.startswith({absent!r} + '.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False", f"import {package} loaded {absent}"
