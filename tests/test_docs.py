"""The docs cannot drift: the site builds, and every command the README and docs/ quote is run or checked.

- the README's test command is `.ci/run`'s;
- the README's Python block and the CLI walk-through (docs/cli.md) run;
- every other `segprune ...` command is checked against the CLI's own parser (subcommand and every flag), every
  `python benchmarks/...` command is parsed by that script's own argparse parser, every `pip install -e ".[x]"`
  names an extra of pyproject.toml, and every Python block compiles and imports what it names.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from segprune.cli import main, parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
WALKTHROUGH = ROOT / "docs" / "cli.md"


def blocks(page: Path, lang: str | None = None) -> list[str]:
    return [code for kind, code in FENCE.findall(page.read_text()) if lang is None or kind == lang]


def commands(page: Path) -> list[str]:
    """Every shell command the page quotes: lines of its code blocks (comments cut) and inline code spans, one
    logical line each (backslash continuations joined); Python blocks excluded."""
    text = page.read_text()
    found = []
    for kind, code in FENCE.findall(text):
        if kind != "python":
            joined = code.replace("\\\n", " ")
            found += [line.split("  #")[0].strip() for line in joined.splitlines()]
    found += [m.group(1).strip() for m in INLINE.finditer(FENCE.sub("", text))]
    return [c for c in found if c]


def subcommand_flags() -> dict[str, set[str]]:
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: set(p._option_string_actions) for name, p in sub.choices.items()}


def cli_problems(command: str, known: dict[str, set[str]]) -> list[str]:
    """What is wrong with a quoted `segprune ...` command (placeholders and [optional] parts allowed): an unknown
    subcommand or a flag the subcommand does not take."""
    words = command.replace("[", " ").replace("]", " ").replace("|", " ").split()
    if len(words) < 2 or words[1].startswith("-"):
        return []  # `segprune --help` and prose such as "segprune run|train|prune"
    names = [w for w in words[1:] if w in known] if words[1] not in known else [words[1]]
    if not names:
        return [f"unknown subcommand {words[1]!r} in {command!r}"]
    flags = {w.split("=")[0] for w in words if w.startswith("--")}
    allowed = set().union(*(known[n] for n in names))
    return [f"{names[0]} takes no {f} (in {command!r})" for f in sorted(flags - allowed)]


class _Parsed(Exception):
    pass


def script_problems(command: str) -> str | None:
    """Parse `python benchmarks/X.py ARGS` with the script's own parser (its module runs up to parse_args, which
    then stops it); placeholders: N -> 1, {1,2,3} -> 1, DIR -> a folder, anything after `...` dropped."""
    words = shlex.split(command.split("...")[0].replace("[", " ").replace("]", " "))
    script = ROOT / words[1]
    if not script.is_file():
        return f"no such script {words[1]}"
    if "parse_args(" not in script.read_text():  # it would run whole: every benchmark has a parser
        return f"{words[1]} has no argument parser"
    args = [re.sub(r"\{(\w+),[^}]*\}", r"\1", w).replace("N", "1") if re.fullmatch(r"[\w/.{},-]*N[\w/.{},-]*|"
            r".*\{.*\}.*", w) else ("/tmp/segprune-docs" if w == "DIR" else w) for w in words[2:]]
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        original(self, argv, namespace)
        raise _Parsed

    argv = sys.argv
    sys.argv = [str(script), *args]
    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            runpy.run_path(str(script), run_name="__main__")
    except _Parsed:
        return None
    except SystemExit as err:
        return f"{command!r}: the script's parser refused it (exit {err.code})"
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = argv
    return f"{command!r}: the script finished without parsing arguments"


def python_problems(code: str) -> list[str]:
    """A Python block must compile, and every `from segprune... import x` / `segprune.a.b` it names must exist."""
    tree = ast.parse(code)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("segprune"):
            module = importlib.import_module(node.module)
            problems += [f"{node.module} has no {a.name}" for a in node.names if not hasattr(module, a.name)]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "segprune":
            if not hasattr(importlib.import_module("segprune"), node.attr):
                problems.append(f"segprune has no {node.attr}")
    return problems


def extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def test_readme_is_short_and_its_test_command_is_ci():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in [b.strip() for b in blocks(ROOT / "README.md", "bash")], "the README's test command is .ci/run's"


def test_every_quoted_segprune_command_matches_the_cli():
    known = subcommand_flags()
    walk = set(blocks(WALKTHROUGH, "bash")[0].splitlines())
    problems = [p for page in PAGES for c in commands(page) if c.startswith("segprune ") and c not in walk
                for p in cli_problems(c, known)]
    assert not problems, "\n".join(problems)


def test_the_checkers_catch_drift():
    known = subcommand_flags()
    assert cli_problems("segprune prune CK --no-such-flag 1 --out D", known) == [
        "prune takes no --no-such-flag (in 'segprune prune CK --no-such-flag 1 --out D')"]
    assert cli_problems("segprune prunee CK", known)
    assert not cli_problems("segprune prune CHECKPOINT --target-macs 0.5 --out DIR", known)
    assert "refused" in script_problems("python benchmarks/latency_camvid.py --no-such-flag")
    assert script_problems("python benchmarks/no_such.py") == "no such script benchmarks/no_such.py"
    assert python_problems("from segprune.prune import no_such_name") == ["segprune.prune has no no_such_name"]
    assert python_problems("import segprune\nsegprune.no_such") == ["segprune has no no_such"]


def test_every_quoted_benchmark_command_parses():
    quoted = sorted({c[c.index("python benchmarks/"):] for page in PAGES for c in commands(page)
                     if re.search(r"python benchmarks/\w", c)})
    assert len(quoted) >= 15, quoted
    problems, skipped = [], []
    for command in quoted:
        try:
            problem = script_problems(command.split(";")[0].split(", then")[0])
        except ModuleNotFoundError as err:  # a script of an optional extra (timm, torch-pruning) not installed here
            skipped.append(f"{command} ({err.name})")
            continue
        if problem:
            problems.append(problem)
    assert not problems, "\n".join(problems)
    assert len(skipped) < len(quoted) / 2, skipped


def test_every_quoted_extra_exists():
    named = {e for page in PAGES for m in re.finditer(r'-e "\.\[([\w,]+)\]"', page.read_text())
             for e in m.group(1).split(",")}
    assert named and named <= extras(), sorted(named - extras())


def test_every_python_block_compiles_and_names_what_exists():
    problems = [f"{page.name}: {p}" for page in PAGES for code in blocks(page, "python")
                for p in python_problems(code)]
    assert not problems, "\n".join(problems)


def test_the_readme_python_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks(ROOT / "README.md", "python")[0], "README.md", "exec"), scope)
    assert (tmp_path / "plan.json").is_file()
    before = sum(p.numel() for p in scope["model"].parameters())
    assert sum(p.numel() for p in scope["pruned"].parameters()) < before


def test_the_cli_walkthrough_runs(tmp_path, monkeypatch):
    """docs/cli.md's walk-through, line by line, in a fresh folder (recipes/ linked in)."""
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    lines = blocks(WALKTHROUGH, "bash")[0].splitlines()
    data = os.environ.get("SEGPRUNE_DATA")
    for line in lines:
        if "$SEGPRUNE_DATA" in line and not (data and Path(data, "camvid").is_dir()):
            continue
        words = shlex.split(line.replace("$SEGPRUNE_DATA", data or ""))
        assert words[0] == "segprune" and main(words[1:]) == 0, line
    assert (tmp_path / "runs/quick/report.json").is_file() and (tmp_path / "runs/quick-l1.onnx").is_file()
    assert (tmp_path / "runs/report/report.html").is_file()
    if not data:
        pytest.skip("the walk-through ran except its predict line, which needs SEGPRUNE_DATA (the folder holding "
                    "camvid/)")
    assert (tmp_path / "runs/masks/predictions.json").is_file()


def test_the_docs_site_builds(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip('the docs site needs the docs extra: pip install -e ".[docs]"')
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "target_macs" in (tmp_path / "site" / "reference" / "index.html").read_text()
