"""The Task carries every task difference: nothing in the workflows, the report floor or the CLI compares a task's
name (only ``workflows/tasks.py`` does), and a new Task registered in a few lines is a recipe and CLI choice."""

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import segprune
from segprune.cli import parser
from segprune.report.common import INSTANCE_ROWS, REPORT_TASKS, ROWS, accuracy_of, rows_of
from segprune.workflows.recipe import TASK_NAMES, Recipe, demo_recipe, recipe_from
from segprune.workflows.tasks import DEFAULT_TASK, TASKS, Task, recorded_task, register_task, task_of

SRC = Path(segprune.__file__).parent
SCOPE = ("workflows", "report", "cli.py")  # what runs, reports and parses; the models' own `task` flag is theirs
HOME = Path("workflows/tasks.py")  # the one place task names are compared
EQUALITY = (ast.Eq, ast.NotEq, ast.Is, ast.IsNot)


def _task_operand(node: ast.AST) -> str | None:
    """Why ``node`` stands for a task name in a comparison, or None: a task name literal (also inside a tuple),
    ``x.task``, ``task_name(...)``, ``x["task"]`` or ``x.get("task")``."""
    if isinstance(node, ast.Constant) and node.value in {"semantic", "instance", *TASKS}:
        return f"literal {node.value!r}"
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return next(filter(None, map(_task_operand, node.elts)), None)
    if isinstance(node, ast.Attribute) and node.attr == "task":
        return ".task"
    if isinstance(node, ast.Call):
        func = node.func
        if getattr(func, "id", getattr(func, "attr", None)) == "task_name":
            return "task_name()"
        if isinstance(func, ast.Attribute) and func.attr == "get" and node.args and _is_task_key(node.args[0]):
            return '.get("task")'
    if isinstance(node, ast.Subscript) and _is_task_key(node.slice):
        return '["task"]'
    return None


def _is_task_key(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value == "task"


def task_name_comparisons(root: Path = SRC) -> list[str]:
    """Every comparison against a task's name under ``root``'s SCOPE, outside HOME. A literal name counts with any
    operator (``in`` a tuple too); ``x.task`` and friends with ==, !=, is, is not (``r.task in TASKS`` is a registry
    lookup, not a comparison)."""
    paths = [p for part in SCOPE for p in ((root / part).rglob("*.py") if (root / part).is_dir() else [root / part])]
    found = []
    for path in sorted(p for p in paths if p.is_file() and p.relative_to(root) != HOME):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            for operand in (node.left, *node.comparators):
                why = _task_operand(operand)
                literal = why is not None and why.startswith("literal")
                if why and (literal or all(isinstance(op, EQUALITY) for op in node.ops)):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {why}")
                    break
    return found


def test_no_task_name_is_compared_outside_the_tasks():
    assert task_name_comparisons() == []


PLANTED = '''
if task.name == "instance": pass
x = r.task != y
ok = task_name(config) == k
k = report.get("task") == t
a = config["task"] is t
b = name in ("semantic", "depth")
fine = r.task in TASKS
also_fine = task_of(r.task) is task
'''


def test_the_comparison_check_can_fail(tmp_path):
    for folder in ("workflows", "report"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "planted.py").write_text(PLANTED)
    (tmp_path / "cli.py").write_text('out = "x" if args.task == "instance" else "y"\n')
    (tmp_path / HOME).write_text(PLANTED)  # the tasks themselves may compare
    found = task_name_comparisons(tmp_path)
    assert len(found) == 2 * 6 + 1, found
    assert not any(f.startswith(str(HOME)) for f in found)
    assert "cli.py:1: .task" in found and "report/planted.py:7: literal 'semantic'" in found


# --- a new task ---------------------------------------------------------------------------------------------------
DEPTH_ROWS = [("abs. rel. error (%)", "abs_rel", lambda v: f"{100 * v:.2f}"), *ROWS[1:]]


class DepthTask(Task):
    """A test task, registered in a few lines: what ARCHITECTURE.md's "Adding a task" sketches."""

    name = "depth_test"
    accuracy_name = "abs. rel. error"
    demo = {"epochs": 1, "task": "depth_test"}
    demo_out = "segprune-depth-demo"


@pytest.fixture
def depth():
    task = register_task(DepthTask(), rows=DEPTH_ROWS, accuracy=("abs_rel", "abs. rel. error (%)"))
    try:
        yield task
    finally:
        TASKS.pop(task.name)
        REPORT_TASKS.pop(task.name)


def test_a_registered_task_is_a_recipe_and_cli_choice(depth):
    assert "depth_test" in TASK_NAMES and task_of("depth_test") is depth
    assert recipe_from(None, {"task": "depth_test"}).task == "depth_test"
    assert demo_recipe("depth_test").epochs == 1
    for argv in (["demo", "--task", "depth_test"], ["train", "--task", "depth_test"],
                 ["check", "--data", "synthetic", "--task", "depth_test"],
                 ["eval", "ckpt", "--data", "synthetic", "--task", "depth_test"]):
        assert parser().parse_args(argv).task == "depth_test"
    report = {"title": "t", **depth.record()}
    assert recorded_task(report) is depth
    assert rows_of(report) is DEPTH_ROWS is depth.rows
    assert accuracy_of(report) == depth.accuracy == ("abs_rel", "abs. rel. error (%)")
    assert depth.title(Recipe(name="d", model="m", method="slimming")) == "d: m (slimming, depth_test)"


def test_an_unregistered_task_is_refused(depth):
    with pytest.raises(ValueError, match="unknown task 'nope'; choose from semantic, instance, depth_test"):
        recipe_from(None, {"task": "nope"})
    with pytest.raises(SystemExit):
        parser().parse_args(["demo", "--task", "nope"])
    with pytest.raises(ValueError, match="already registered"):
        register_task(DepthTask())


def test_the_builtin_tasks_report_as_before():
    semantic, instance = task_of("semantic"), task_of("instance")
    assert DEFAULT_TASK == Recipe().task == "semantic" and recorded_task({}) is semantic
    assert semantic.record() == {} and instance.record() == {"task": "instance"}  # report.json as before tasks
    assert semantic.rows is ROWS and semantic.accuracy == ("miou", "mIoU (%)")
    assert instance.rows is INSTANCE_ROWS and instance.accuracy == ("mask_ap", "mask AP (%)")
    assert semantic.title(Recipe()) == "demo: pspnet_resnet18 (slimming)"
    assert instance.title(demo_recipe("instance")) == "instance-demo: test_yolact (slimming, instance)"
    assert (semantic.demo_out, instance.demo_out) == ("segprune-demo", "segprune-instance-demo")
    assert semantic.change({"miou": 0.5, "fg_iou": 0.25}, {"miou": 0.4, "fg_iou": 0.2}) == [
        "mIoU 0.5000 -> 0.4000", "foreground IoU 0.2500 -> 0.2000"]


def test_the_base_task_states_its_contract():
    task = Task()
    with pytest.raises(NotImplementedError, match="aux_layers"):
        task.pixel_loss(Recipe(), None)
    x = torch.zeros(1, 3, 8, 8)
    assert task.prune_inputs(nn.Conv2d(3, 4, 1), x) is x

    class Published(nn.Conv2d):
        def prune_inputs(self, example):
            return {"x": example}

    assert task.prune_inputs(Published(3, 4, 1), x) == {"x": x}
