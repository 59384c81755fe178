"""The floors of the house (ARCHITECTURE.md): nothing imports upward, no two floors import each other, segprune's
own imports sit at module top, and the engine loads without the model zoo.

The checker reads every file with ``ast`` and sees three kinds of import: absolute ones, relative ones (resolved
to the absolute module they name, so ``from ..prune import api`` inside models/ is an import of segprune.prune)
and the entries of a module's lazy table ``_LAZY = {name: module}`` (imported on first use by ``__getattr__``).
The package's face (``segprune/__init__.py``) may reach any floor lazily: that is its job. A lazy table anywhere
else is checked like eager imports, and ``from segprune import name`` of a lazy name is an import of the module
that the face fetches it from, so a lower floor cannot reach upward through the face. The checker's functions take
the package folder, so the tests below also run it on planted violations in a temporary tree.
"""

import ast
import subprocess
import sys
from dataclasses import dataclass
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
FACE = "__init__"  # the floor of the package's own __init__.py


@dataclass(frozen=True)
class Edge:
    """One import: ``source`` module imports ``target`` at ``line``; ``nested`` inside a function, ``lazy`` through
    a lazy table."""

    source: str
    target: str
    line: int
    nested: bool = False
    lazy: bool = False


def floor_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else FACE


def module_name(path: Path, root: Path) -> str:
    """The dotted name of ``path`` inside the package folder ``root`` (a package is named by its folder)."""
    rel = path.relative_to(root.parent).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module a ``from ... import`` names, relative imports resolved against ``module``'s package."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def lazy_table(tree: ast.Module) -> dict[str, str]:
    """The module-level ``_LAZY = {name: module}`` of a file (empty when it has none)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def from_the_package(name: str, root: Path, lazy: dict[str, str]) -> str:
    """What ``from segprune import name`` imports: the submodule of that name, else the module the face's lazy
    table fetches it from, else the face itself."""
    if (root / f"{name}.py").exists() or (root / name / "__init__.py").exists():
        return f"{root.name}.{name}"
    return lazy.get(name, root.name)


def package_imports(tree: ast.Module, module: str, is_package: bool, root: Path, lazy: dict[str, str]):
    """(node, imported module) for every import of the package in the file, relative ones resolved."""
    package = root.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node, a.name) for a in node.names if a.name.split(".")[0] == package)
        elif isinstance(node, ast.ImportFrom):
            target = absolute(node, module, is_package)
            if target == package:  # from segprune import checkpoint: the module named
                yield from ((node, from_the_package(a.name, root, lazy)) for a in node.names)
            elif target.split(".")[0] == package:
                yield node, target


def _nested_ids(tree: ast.Module) -> set[int]:
    return {id(sub) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
            for sub in ast.walk(fn)}


def edges(root: Path):
    """Every import of the package inside it: eager ones and the entries of lazy tables."""
    face_lazy = lazy_table(ast.parse((root / "__init__.py").read_text()))
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        module, inner = module_name(path, root), _nested_ids(tree)
        for node, target in package_imports(tree, module, path.name == "__init__.py", root, face_lazy):
            yield Edge(module, target, node.lineno, nested=id(node) in inner)
        for target in lazy_table(tree).values():
            yield Edge(module, target, 0, lazy=True)


def exists(module: str, root: Path) -> bool:
    """Whether the dotted ``module`` is a file or package inside ``root``."""
    path = root.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def violations(root: Path, allowed=ALLOWED) -> list[str]:
    """One line per import that goes upward or sideways, or names a module that does not exist."""
    bad = []
    for e in edges(root):
        a, b = floor_of(e.source), floor_of(e.target)
        where = f"{e.source}:{e.line}" if not e.lazy else f"{e.source} (lazy table)"
        if not exists(e.target, root) and e.target != root.name:
            bad.append(f"{where} imports {e.target}, which does not exist")
        elif a != b and b not in allowed[a] and not (e.lazy and a == FACE):
            bad.append(f"{where} imports {e.target} ({a} may import {sorted(allowed[a]) or 'nothing'})")
    return bad


def nested_imports(root: Path) -> list[str]:
    return [f"{e.source}:{e.line} imports {e.target} inside a function" for e in edges(root) if e.nested]


def test_every_floor_is_known():
    floors = {floor_of(module_name(p, ROOT)) for p in ROOT.rglob("*.py")}
    assert floors <= set(ALLOWED), f"floors without a rule: {floors - set(ALLOWED)}"


def test_nothing_imports_upward_or_sideways():
    bad = violations(ROOT)
    assert not bad, "\n".join(bad)


def test_the_checker_sees_relative_and_lazy_imports():
    found = {(e.source, e.target, e.lazy) for e in edges(ROOT)}
    assert ("segprune.models.pspnet", "segprune.models.registry", False) in found  # from .registry import ...
    assert ("segprune", "segprune.workflows.inference", True) in found  # the face's lazy table


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
    inner = nested_imports(ROOT)
    assert not inner, "\n".join(inner)


@pytest.mark.parametrize("package, absent", [("segprune.prune", "segprune.models"),
                                             ("segprune.prune", "segprune.eval"),
                                             ("segprune.prune", "matplotlib"),
                                             ("segprune.data", "segprune.models")])
def test_a_floor_loads_without_those_above_it(package, absent):
    code = f"import sys, {package}; print(any(m == {absent!r} or m.startswith({absent!r} + '.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False", f"import {package} loaded {absent}"


# --- the checker on planted violations ------------------------------------------------------------------------
CLEAN = {
    "__init__.py": "from segprune.prune import api\n_LAZY = {'load': 'segprune.checkpoint', 'run': 'segprune.cli'}\n",
    "_utils.py": "",
    "cli.py": "from segprune import checkpoint\n",
    "checkpoint.py": "from . import models\nfrom .prune import api\n",
    "prune/__init__.py": "from .api import prune\n",
    "prune/api.py": "from .._utils import x\nfrom segprune._utils import y\n",
    "models/__init__.py": "from . import net\n",
    "models/net.py": "from .. import _utils\nfrom .layers import conv\n",
    "models/layers.py": "",
    "eval/__init__.py": "",
    "eval/metrics.py": "from ..data import loader\nfrom segprune import checkpoint\n",
    "data/__init__.py": "",
    "data/loader.py": "",
}


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "segprune"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_a_clean_tree_has_no_violation(tmp_path):
    root = _tree(tmp_path, CLEAN)
    assert len(list(edges(root))) == 14  # every import above was seen (3 lazy or from the face included)
    assert violations(root) == []
    assert nested_imports(root) == []


@pytest.mark.parametrize("rel, text, expected", [
    ("models/net.py", "from ..prune import api\n", "segprune.models.net:1 imports segprune.prune (models may"),
    ("models/net.py", "from ... import x\nfrom .. import checkpoint\n", "segprune.models.net:2 imports "
                                                                        "segprune.checkpoint (models may"),
    ("models/net.py", "import os\nfrom segprune.eval import metrics\n", "segprune.models.net:2 imports segprune.eval"),
    ("models/net.py", "import segprune.eval.metrics\n", "segprune.models.net:1 imports segprune.eval.metrics"),
    ("prune/api.py", "from segprune import load\n", "segprune.prune.api:1 imports segprune.checkpoint (prune may"),
    ("prune/api.py", "from segprune import Plan\n", "segprune.prune.api:1 imports segprune (prune may"),
    ("data/__init__.py", "_LAZY = {'create': 'segprune.models.net'}\n",
     "segprune.data (lazy table) imports segprune.models.net (data may"),
    ("__init__.py", "_LAZY = {'load': 'segprune.checkpoints'}\n", "segprune (lazy table) imports "
                                                                  "segprune.checkpoints, which does not exist"),
    ("__init__.py", "from segprune.cli import main\n", "segprune:1 imports segprune.cli (__init__ may"),
])
def test_a_planted_violation_is_reported(tmp_path, rel, text, expected):
    root = _tree(tmp_path, {**CLEAN, rel: text})
    bad = violations(root)
    assert any(line.startswith(expected) for line in bad), bad


def test_a_planted_import_inside_a_function_is_reported(tmp_path):
    root = _tree(tmp_path, {**CLEAN, "models/net.py": "def f():\n    from . import layers\n"})
    assert nested_imports(root) == ["segprune.models.net:2 imports segprune.models inside a function"]
