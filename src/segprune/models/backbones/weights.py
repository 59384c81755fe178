"""Backbone weights from a local file, in our own layout or in torchvision's ImageNet layout; nothing is downloaded.

A file whose keys overlap the backbone's own state dict is read as our layout and must match it exactly. Otherwise
it is read as torchvision's layout (``resnet*``, ``vgg16_bn``, ``mobilenet_v2`` checkpoints) through the backbone's
``torchvision_keys()`` map, which names, for each of our ConvBnAct layers, torchvision's conv and norm. Two
conventions are bridged: a missing ``num_batches_tracked`` (torchvision's older checkpoints predate it) keeps ours,
and a conv bias (VGG's convs have one, ours do not) is folded into the next BatchNorm's running mean, which is
exact: ``BN(Wx + b)`` with mean μ equals ``BN(Wx)`` with mean ``μ - b``, in eval mode and in training alike.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

_SHOWN = 10  # offenders named per kind in an error message


@dataclass
class KeyMap:
    """How a backbone's layers are named in torchvision's checkpoint of the same network.

    Attributes:
        layers: our ConvBnAct module name → (torchvision's conv module name, torchvision's norm module name).
        no_counterpart: our ConvBnAct module names torchvision has no counterpart for; they keep their init.
        unused: prefixes of torchvision keys with nothing to load into (the ImageNet classifier, ...).
    """

    layers: dict[str, tuple[str, str]]
    no_counterpart: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()


@dataclass
class LoadReport:
    """What ``load_backbone_weights`` did.

    Attributes:
        layout: "segprune" (our own keys) or "torchvision".
        loaded: our state-dict keys that were set from the file.
        left_at_init: our module names with no counterpart in the file's layout, which keep their initialisation.
        ignored: file keys with nothing to load into (e.g. ``fc.weight``).
        folded_biases: file conv biases folded into the following norm's running mean.
    """

    layout: str
    loaded: list[str]
    left_at_init: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    folded_biases: list[str] = field(default_factory=list)


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> LoadReport:
    """Load a local checkpoint into a backbone, warning about layers left at their initialisation.

    Args:
        backbone: the module to load into (``model.backbone`` or ``model.encoder``).
        path: a ``.safetensors`` file, or any other file readable by ``torch.load(weights_only=True)``, holding a
            flat state dict in our layout or in torchvision's.

    Returns:
        What was loaded, left at initialisation, ignored, and folded.

    Raises:
        ValueError: if the file is missing or unreadable, or its keys or shapes do not fit, listing the missing and
            unexpected keys and the shape mismatches.
    """
    path = Path(path)
    state, report = translate_state_dict(backbone, _read_state_dict(path), source=str(path))
    backbone.load_state_dict(state)
    if report.left_at_init:
        warnings.warn(
            f"{len(report.left_at_init)} layers of {type(backbone).__name__} have no counterpart in {path} "
            f"({report.layout} layout) and keep their initialisation: {', '.join(report.left_at_init)}",
            stacklevel=2,
        )
    return report


def translate_state_dict(
    backbone: nn.Module, state: dict[str, Tensor], *, source: str = "the state dict"
) -> tuple[dict[str, Tensor], LoadReport]:
    """The backbone's full state dict with every entry the file provides, and a report. The only arithmetic is the
    bias fold, so ``backbone`` and ``state`` may live on the meta device (the tests check full-size layouts so).

    Raises:
        ValueError: as ``load_backbone_weights``.
    """
    own = backbone.state_dict()
    if not hasattr(backbone, "torchvision_keys") or own.keys() & state.keys():
        _check(backbone, own, state, {k: k for k in own}, set(), source=source, layout="segprune")
        return dict(own) | state, LoadReport("segprune", sorted(state.keys() & own.keys()))
    keymap = backbone.torchvision_keys()
    sources = _torchvision_sources(backbone, keymap)
    biases = _foldable_biases(backbone, keymap, state)
    ignored = sorted(k for k in state if k.startswith(keymap.unused) and k not in biases)
    _check(backbone, own, state, sources, set(biases) | set(ignored), source=source, layout="torchvision")
    merged = dict(own) | {ours: state[theirs] for ours, theirs in sources.items() if theirs in state}
    for bias, mean in biases.items():
        merged[mean] = merged[mean] - state[bias]
    loaded = sorted(ours for ours, theirs in sources.items() if theirs in state)
    return merged, LoadReport("torchvision", loaded, sorted(keymap.no_counterpart), ignored, sorted(biases))


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise ValueError(f"backbone weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code, ever
    except Exception as err:  # the readers raise half a dozen types; the caller needs one
        raise ValueError(f"could not read backbone weights {path}: {err}") from err
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors (top-level keys: {list(state)[:5]})")
    return state


def _torchvision_sources(backbone: nn.Module, keymap: KeyMap) -> dict[str, str]:
    """Our state-dict key → torchvision's, for every layer of the key map; every other key must be left at init."""
    sources = {}
    for ours, (conv, norm) in keymap.layers.items():
        layer = backbone.get_submodule(ours)
        sources |= {f"{ours}.conv.{k}": f"{conv}.{k}" for k in layer.conv.state_dict()}
        sources |= {f"{ours}.bn.{k}": f"{norm}.{k}" for k in layer.bn.state_dict()}
    left = tuple(f"{name}." for name in keymap.no_counterpart)
    unmapped = [k for k in backbone.state_dict() if k not in sources and not k.startswith(left)]
    if unmapped:  # a key map that forgets a layer would leave it at init without a word
        raise ValueError(f"the torchvision key map of {type(backbone).__name__} misses {unmapped[:_SHOWN]}")
    return sources


def _foldable_biases(backbone: nn.Module, keymap: KeyMap, state: dict[str, Tensor]) -> dict[str, str]:
    """File conv bias → our running-mean key, for mapped convs that have a bias in the file and none here."""
    return {
        f"{conv}.bias": f"{ours}.bn.running_mean"
        for ours, (conv, _) in keymap.layers.items()
        if f"{conv}.bias" in state and backbone.get_submodule(ours).conv.bias is None
    }


def _check(
    backbone: nn.Module,
    own: dict[str, Tensor],
    state: dict[str, Tensor],
    sources: dict[str, str],
    consumed: set[str],
    *,
    source: str,
    layout: str,
) -> None:
    """Raise ``ValueError`` naming missing keys, unexpected keys and shape mismatches, if there are any."""
    expected = set(sources.values())
    missing = sorted(t for t in expected - state.keys() if not t.endswith("num_batches_tracked"))
    unexpected = sorted(state.keys() - expected - consumed)
    shapes = [
        f"{theirs}: file {tuple(state[theirs].shape)} vs model {tuple(own[ours].shape)}"
        for theirs, ours in sorted((theirs, ours) for ours, theirs in sources.items())
        if theirs in state and state[theirs].shape != own[ours].shape
    ]
    problems = [
        f"{len(items)} {what}: {', '.join(items[:_SHOWN])}{', ...' if len(items) > _SHOWN else ''}"
        for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if items
    ]
    if problems:
        raise ValueError(
            f"backbone weights {source} ({layout} layout) do not fit {type(backbone).__name__}: " + "; ".join(problems)
        )
