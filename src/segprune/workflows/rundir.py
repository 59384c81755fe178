"""Output folders: the one place that decides whether a command may write where it is told to, then clears, seeds
and logs run folders.

Every command that writes claims its output before any work: ``claim`` for a folder (a run, a checkpoint, a combined
report, predictions), ``claim_file`` for one file (an export, ``bench --json``). A used output is refused in one
wording, "<folder> already holds <names>; choose another <option> or pass --force". A folder counts as used when
it holds what the command writes (``writes``) or, for a command that fills the folder (``writes=None``), anything
but what a run that failed before its first checkpoint leaves (its recipe and log): the corrected command may use it
again without ``--force`` (the old log is appended to).
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import yaml

from segprune.report.common import write_atomic
from segprune.workflows.taskbase import DEFAULT_TASK

# what a run that failed before its first checkpoint leaves
LEFTOVERS = ("recipe.yaml", "log.txt", "tensorboard", "train.csv")
WRITTEN = ("checkpoints", "model", "pruned", "tensorboard", "train.csv", "metrics.json", "log.txt", "report.json",
           "report.md", "report.html", "path.json", "path.png")  # what runs write (cleared by --force)
RESUME_MAY_CHANGE = ("threads", "num_workers", "device")  # how a run computes, not what
MAX_NAMED = 5  # a refusal names this many of what the folder holds


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds anything but the recipe and log of a run that failed before its first checkpoint."""
    return bool(_held(out, None))


def _held(out: Path, writes) -> list[str]:
    """What of ``writes`` (or, for None, anything but a failed run's LEFTOVERS) the folder ``out`` holds."""
    if not out.is_dir():
        return []
    if writes is not None:
        return [name for name in writes if (out / name).exists()]
    return sorted(path.name for path in out.iterdir() if path.name not in LEFTOVERS)


def _refusal(where: str, names: list[str], option: str) -> str:
    """The one wording of a used output."""
    shown = ", ".join(names[:MAX_NAMED]) + (f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else "")
    return f"{where} already holds {shown}; choose another {option} or pass --force"


def claim(out: str | Path, *, writes: Sequence[str] | None = None, force: bool = False, resume: bool | None = None,
          settings: dict | None = None, option: str = "--out") -> Path:
    """Check, before any work, that the folder ``out`` may be written (or a training run there resumed with the same
    ``settings``); creates nothing.

    Args:
        writes: The names the command writes into ``out``; only those make it used (predictions may go into a
            folder of other files). None: the command fills the folder, and anything in it but what a run that
            failed before its first checkpoint leaves makes it used.
        force: Write into a used folder (what is there is overwritten or, for runs, cleared by :func:`start`).
        resume: Continue the run in ``out``; None for commands that cannot resume (the refusal then names only
            ``--force``).
        option: The command-line option that named ``out``, for the message.

    Raises:
        FileExistsError: ``out`` is a file, or is used and neither ``force`` nor ``resume`` was given.
        FileNotFoundError / ValueError: ``resume`` with no run there, with other settings, or with ``force``.
    """
    out = Path(out)
    if force and resume:
        raise ValueError("--resume continues a run, --force starts it over: pass one")
    if resume:
        _check_resume(out, settings or {})
        return out
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder; choose another {option}")
    held = _held(out, writes)
    if held and not force:
        hint = " (or --resume to continue a training run)" if resume is False else ""
        raise FileExistsError(_refusal(str(out), held, option) + hint)
    return out


def claim_file(path: str | Path, *, force: bool = False, option: str = "--out") -> Path:
    """Check, before any work, that the single output file ``path`` may be written: refused when it exists,
    unless ``force``, in :func:`claim`'s wording; a folder there is always refused."""
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"{path} is a folder, not a file; choose another {option}")
    if path.exists() and not force:
        where = "the current folder" if path.parent == Path(".") else str(path.parent)
        raise FileExistsError(_refusal(where, [path.name], option))
    return path


def _check_resume(out: Path, settings: dict) -> None:
    saved = out / "recipe.yaml"
    if not saved.is_file() or not (out / "checkpoints").exists():
        raise FileNotFoundError(f"{out}: no run to resume (no recipe.yaml and checkpoints/); start it without "
                                "--resume")
    old = {"task": DEFAULT_TASK, **(yaml.safe_load(saved.read_text()) or {})}  # runs before `task` were semantic
    changed = sorted(k for k in settings if old.get(k) != settings[k] and k not in RESUME_MAY_CHANGE)
    if changed:
        raise ValueError(f"--resume needs the settings of the run in {out}; these differ: {', '.join(changed)}")


def start(out: Path, settings: dict, *, resume: bool = False) -> None:
    """Create ``out``; unless resuming, clear what an earlier run wrote there and save ``settings`` as
    recipe.yaml (so nothing of an earlier run mixes with this one)."""
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        return
    for path in (out / name for name in WRITTEN):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    write_atomic(out / "recipe.yaml", yaml.safe_dump(settings, sort_keys=False))


def seed_everything(seed: int, threads: int | None = None) -> None:
    """Seed torch, numpy and ``random`` (every DDP rank alike, see :mod:`segprune.train.resume`); set threads."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if threads:
        torch.set_num_threads(threads)


class RunLog:
    """Print a line (unless quiet) and keep it in the run's log file."""

    def __init__(self, path: Path, echo: bool = True):
        self.path, self.echo = path, echo

    def __call__(self, line: str) -> None:
        if self.echo:
            print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")
