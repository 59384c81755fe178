"""Run folders: the one place that decides whether a folder may be written, clears it, seeds a run and logs it.

A folder is free when it is empty or holds only what a run that failed before its first checkpoint leaves (its
recipe and log): the corrected command may use it again without ``--force`` (the old log is appended to). Anything
else in it, a result or a file of the user's, makes ``--force`` (or ``--resume``) necessary. Every command checks
its ``--out`` before it works.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from segprune.workflows.taskbase import DEFAULT_TASK

# what a run that failed before its first checkpoint leaves
LEFTOVERS = ("recipe.yaml", "log.txt", "tensorboard", "train.csv")
WRITTEN = ("checkpoints", "model", "pruned", "tensorboard", "train.csv", "metrics.json", "log.txt", "report.json",
           "report.md", "report.html", "path.json", "path.png")  # what runs write (cleared by --force)
RESUME_MAY_CHANGE = ("threads", "num_workers", "device")  # how a run computes, not what


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds anything but the recipe and log of a run that failed before its first checkpoint."""
    return out.is_dir() and any(path.name not in LEFTOVERS for path in out.iterdir())


def claim(out: str | Path, *, force: bool = False, resume: bool = False, settings: dict | None = None) -> Path:
    """Check that ``out`` may be written by a new run (or resumed with the same ``settings``) before any work.

    Raises:
        FileExistsError: ``out`` holds a run and neither ``force`` nor ``resume`` was given.
        FileNotFoundError / ValueError: ``resume`` with no run there, or with other settings.
    """
    out = Path(out)
    if force and resume:
        raise ValueError("--resume continues a run, --force starts it over: pass one")
    if resume:
        _check_resume(out, settings or {})
    elif out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a run folder")
    elif out.exists() and holds_run(out) and not force:
        raise FileExistsError(f"{out} already holds a run; choose another --out, pass --force to start over, or "
                              "--resume to continue a training run")
    return out


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
    (out / "recipe.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))


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
