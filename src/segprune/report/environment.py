"""Where a report's numbers were measured: versions, CPU and GPU, threads, and the code's git commit.

Latency and even accuracy (cuDNN, thread counts) depend on these, so every report.json records them; a field that
cannot be found is None, never an error.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

_PACKAGE = Path(__file__).resolve().parents[1]  # src/segprune


def environment() -> dict:
    """Versions (python, torch, numpy, onnx, onnxruntime), platform, CPU model and count, torch threads, GPU name
    and CUDA version (None without one), and the git commit and dirtiness of the checkout segprune runs from (None
    when it is not one, e.g. an installed wheel)."""
    commit = git_commit(_PACKAGE)
    return {
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime"),
        "platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "gpu": gpu_name(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "git_commit": commit, "git_dirty": _git_dirty(_PACKAGE) if commit else None,
    }  # fmt: skip


def _version(module: str) -> str | None:
    """The version of an optional package, without importing it (onnxruntime's import alone takes a while)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return sys.modules[module].__version__ if module in sys.modules else None


def cpu_model() -> str | None:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def gpu_name() -> str | None:
    """The name of the first CUDA device, or None."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit(folder: Path = _PACKAGE) -> str | None:
    """The commit checked out where ``folder`` lies, or None outside a git checkout (or without git)."""
    return _git(folder, "rev-parse", "HEAD") or None


def _git_dirty(folder: Path) -> bool | None:
    status = _git(folder, "status", "--porcelain", "--untracked-files=no", "--", ".")
    return None if status is None else bool(status)
