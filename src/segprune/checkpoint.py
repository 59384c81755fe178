"""Checkpoints without pickle: `{weights.safetensors, plan.json, config.json}` in one folder.

Loading is build -> replay plan -> load weights, so a pruned model comes back as a plain nn.Module
from the registry's builder. Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from segprune.models import create_model
from segprune.prune.plan import Plan


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def save(folder: str | Path, model: nn.Module, *, config: dict, plan: Plan | None = None) -> Path:
    """Save `model`'s weights, its pruning plan and the config that builds it (`config["model"]` + kwargs)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    _atomic_write(folder / "weights.safetensors", lambda p: save_file(state, str(p)))
    _atomic_write(folder / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
    (plan or Plan()).save(folder / "plan.json")
    return folder


def load_plan(folder: str | Path) -> Plan:
    """The plan a checkpoint was pruned with (empty for an unpruned one)."""
    return Plan.load(Path(folder) / "plan.json")


def load_config(folder: str | Path) -> dict:
    """The config that builds a checkpoint's model."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a segprune checkpoint ({err})") from err


def load(folder: str | Path) -> nn.Module:
    """Rebuild a (pruned) model saved by `save`: build from config, replay the plan, load the weights."""
    folder = Path(folder)
    config = load_config(folder)
    try:
        model = create_model(config["model"], **config.get("model_kwargs", {}))
    except (KeyError, TypeError) as err:
        raise ValueError(f"{folder / 'config.json'}: cannot build the model ({err})") from err
    Plan.load(folder / "plan.json").apply(model)
    try:
        state = load_file(str(folder / "weights.safetensors"))
    except (OSError, SafetensorError) as err:
        raise ValueError(f"{folder / 'weights.safetensors'}: unreadable weights ({err})") from err
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing/unexpected keys or shapes: the weights belong to another architecture
        raise ValueError(f"{folder / 'weights.safetensors'} does not fit the model its config builds: {err}") from err
    return model.eval()
