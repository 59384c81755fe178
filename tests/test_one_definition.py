"""Helpers with one meaning are defined once: the main logits of an output come from ``segprune._utils.logits``
and the producer layer types from ``segprune.prune.graph.PRODUCERS``; a second copy could drift from the first."""

import ast
from pathlib import Path

import segprune

ROOT = Path(segprune.__file__).parent
OWNED_ELSEWHERE = {"workflows/bench.py"}  # rewritten by another change; it may still hold a copy until then


def _sources():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel not in OWNED_ELSEWHERE:
            yield rel, path.read_text()


def _is_logits_copy(node) -> bool:
    """``x["out"] if isinstance(x, dict) else x``: what ``_utils.logits`` does, written out again."""
    return (isinstance(node, ast.IfExp) and isinstance(node.test, ast.Call)
            and getattr(node.test.func, "id", None) == "isinstance" and isinstance(node.body, ast.Subscript)
            and isinstance(node.body.slice, ast.Constant) and node.body.slice.value == "out")


def test_the_main_logits_are_taken_in_one_place():
    copies = [f"{rel}:{node.lineno}" for rel, text in _sources() for node in ast.walk(ast.parse(text))
              if _is_logits_copy(node) and rel != "_utils.py"]
    assert not copies, f"inline copies of segprune._utils.logits: {copies}"


def test_the_logits_helper_has_one_name():
    defined = [f"{rel}:{node.name}" for rel, text in _sources() for node in ast.parse(text).body
               if isinstance(node, ast.FunctionDef) and node.name in ("logits", "_logits")]  # module level
    assert defined == ["_utils.py:logits"]


def test_producers_are_defined_once():
    names = ("PRODUCERS", "_PRODUCERS")
    defined = [rel for rel, text in _sources() for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Assign)
               for target in node.targets if getattr(target, "id", None) in names]
    assert defined == ["prune/graph.py"]
