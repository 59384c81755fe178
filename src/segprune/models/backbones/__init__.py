"""Backbones: feature extractors publishing ``out_channels`` and returning a list of stage features."""

from pathlib import Path

import torch
from torch import nn

from .mobilenetv2 import MobileNetV2, mobilenetv2
from .resnet import RESNET_CONFIGS, ResNet, resnet
from .vgg import VGG, vgg16_bn

__all__ = [
    "VGG",
    "MobileNetV2",
    "RESNET_CONFIGS",
    "ResNet",
    "load_backbone_weights",
    "mobilenetv2",
    "resnet",
    "vgg16_bn",
]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code, ever
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a local state dict into a backbone; nothing is ever downloaded.

    Args:
        backbone: the module to load into (``model.backbone`` or ``model.encoder``).
        path: a ``.safetensors`` file, or any other file readable by ``torch.load(weights_only=True)``.

    Raises:
        ValueError: if keys or shapes differ, naming the first few offenders of each kind.
    """
    path = Path(path)
    state, own = _read_state_dict(path), backbone.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(own.keys() & state.keys())
        if state[k].shape != own[k].shape
    ]
    problems = [
        f"{len(items)} {what} (e.g. {', '.join(items[:3])})"
        for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if items
    ]
    if problems:
        raise ValueError(f"backbone weights {path} do not fit {type(backbone).__name__}: " + "; ".join(problems))
    backbone.load_state_dict(state)
