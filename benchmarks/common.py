"""Shared helpers for benchmark scripts: machine description, atomic JSON results, trained-model caches,
child-process runs."""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available()
            else None, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def rss_mb() -> float:
    """Resident memory now (MiB)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: str, *args: str) -> dict:
    """Run one measurement in a fresh process (so peak memory is its own) and parse the JSON it prints."""
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_result(name: str, data: dict) -> Path:
    """Write results/<name>.json atomically and print it."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    print(json.dumps(data, indent=2))
    return path


def cached_curve(path: Path, model: torch.nn.Module) -> list[float] | None:
    """Load the model trained before into cache folder `path` into `model`; its validation curve, or None."""
    if not (path / "model.safetensors").exists():
        return None
    model.load_state_dict(load_file(path / "model.safetensors"))
    return json.loads((path / "curve.json").read_text())


def cache_trained(path: Path, model: torch.nn.Module, curve: list[float]) -> None:
    """Keep a trained model and its curve in cache folder `path`, whole or not at all: written beside it, then
    renamed, so a run killed while saving leaves no half-written model for the next run to load."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(model.state_dict(), tmp / "model.safetensors")
    (tmp / "curve.json").write_text(json.dumps(curve))
    tmp.replace(path)
