"""Checkpoints without pickle: `{weights.safetensors, plan.json, config.json}` in one folder.

Loading is build -> replay plan -> load weights, so a pruned model comes back as a plain nn.Module
from the registry's builder. Every file is written to a temporary name and renamed into place.

Every way a checkpoint can be broken is a `CheckpointError` (a ValueError) naming the file: a missing folder
or file, a truncated or garbled JSON file, a plan that does not fit the model its config builds, weights that
safetensors cannot read, weights whose bytes changed after saving (the SHA-256 of the tensors is kept in the
safetensors header; checkpoints written before it existed are loaded without that check), and weights of
another architecture.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from segprune.models import create_model, library_model
from segprune.prune.plan import Plan

FILES = ("weights.safetensors", "plan.json", "config.json")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file and what is wrong with it."""


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``state``'s tensors, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save(folder: str | Path, model: nn.Module, *, config: dict, plan: Plan | None = None) -> Path:
    """Save `model`'s weights, its pruning plan and the config that builds it (`config["model"]` + kwargs)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {"format": "segprune.weights/1", "sha256": tensors_digest(state)}
    _atomic_write(folder / "weights.safetensors", lambda p: save_file(state, str(p), metadata=metadata))
    _atomic_write(folder / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
    (plan or Plan()).save(folder / "plan.json")
    return folder


def _file(folder: str | Path, name: str) -> Path:
    """``folder/name``, or a CheckpointError saying which of the two is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise CheckpointError(f"{folder}: {what}; a segprune checkpoint is a folder holding {', '.join(FILES)}")
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {folder} is not a segprune checkpoint (it needs {', '.join(FILES)})")
    return path


def load_plan(folder: str | Path) -> Plan:
    """The plan a checkpoint was pruned with (empty for an unpruned one)."""
    path = _file(folder, "plan.json")
    try:
        plan = Plan.load(path)
    except (ValueError, OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt plan ({err})") from err
    if not isinstance(plan.modules, dict) or not all(isinstance(e, dict) for e in plan.modules.values()):
        raise CheckpointError(f"{path}: corrupt plan (\"modules\" must map layer names to objects)")
    return plan


def load_config(folder: str | Path) -> dict:
    """The config that builds a checkpoint's model."""
    path = _file(folder, "config.json")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a segprune checkpoint config ({err})") from err
    if not isinstance(config, dict) or not isinstance(config.get("model"), str):
        raise CheckpointError(f"{path}: not a segprune checkpoint config (expected an object with a \"model\" name)")
    if not isinstance(config.get("model_kwargs", {}), dict):
        raise CheckpointError(f"{path}: \"model_kwargs\" must be an object")
    return config


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of ``weights.safetensors``, checked against the digest saved with them (when there is one)."""
    path = _file(folder, "weights.safetensors")
    state, metadata = _read_safetensors(path)
    expected = metadata.get("sha256")
    if expected is not None and tensors_digest(state) != expected:
        raise CheckpointError(f"{path}: the weights changed after they were saved (SHA-256 mismatch): "
                              "the file is corrupt or was edited")
    return state


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata of a safetensors file; a CheckpointError naming it when it is unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (OSError, SafetensorError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable weights, truncated or not a safetensors file ({err})") from err


def build(folder: str | Path) -> nn.Module:
    """The model a checkpoint's config builds, with its plan replayed: the right shapes, untrained weights."""
    folder = Path(folder)
    config = load_config(folder)
    try:
        model = create_model(config["model"], **config.get("model_kwargs", {}))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{folder / 'config.json'}: cannot build the model ({err})") from err
    plan = load_plan(folder)
    try:
        plan.apply(model)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as err:
        raise CheckpointError(f"{folder / 'plan.json'} does not fit the model {config['model']!r} ({err})") from err
    return model


def load(folder: str | Path) -> nn.Module:
    """Rebuild a (pruned) model saved by `save`: build from config, replay the plan, load the weights.

    Raises:
        CheckpointError: (a ValueError) naming the file that is missing, corrupt or does not fit.
    """
    folder = Path(folder)
    model = build(folder)
    state = load_weights(folder)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing/unexpected keys or shapes: the weights belong to another architecture
        raise CheckpointError(f"{folder / 'weights.safetensors'} does not fit the model its config builds: "
                              f"{err}") from err
    return model.eval()


def load_pretrained(model: nn.Module, path: str | Path) -> tuple[int, list[str]]:
    """Initialise ``model`` from a local safetensors file (no pickle), by its own state dict's names or, for a
    library model (``smp:...``), the library's (what that library's weights files hold). A tensor of another shape
    (a head for another class count) and a tensor the file lacks keep their initialisation.

    Returns:
        (tensors loaded, names left as initialised).

    Raises:
        CheckpointError: naming the file, when it is unreadable, holds a tensor the model lacks (another
            architecture), or holds none that fit.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: the weights file does not exist")
    state, _ = _read_safetensors(path)
    target = library_model(model)
    own = target.state_dict()
    foreign = sorted(set(state) - set(own))
    if foreign:
        raise CheckpointError(f"{path} does not fit {type(target).__name__}: it holds {len(foreign)} tensor(s) the "
                              f"model lacks ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})")
    fit = {k: v for k, v in state.items() if v.shape == own[k].shape}
    if not fit:
        raise CheckpointError(f"{path} does not fit {type(target).__name__}: none of its tensors has the model's shape")
    target.load_state_dict(fit, strict=False)
    return len(fit), sorted(set(own) - set(fit))
