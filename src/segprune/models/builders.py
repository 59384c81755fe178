"""Models from other libraries, named by a spec that a recipe and a checkpoint can hold: ``"<builder>:<name>"``
plus keyword arguments.

Built in: ``smp:<Arch>`` (segmentation_models_pytorch, e.g. ``smp:Segformer`` with ``encoder_name="mit_b0"``),
``timm:<model>`` (a timm backbone's last feature map, a 1×1 linear head, upsampled: the DINOv2-style linear probe),
``transformers:<Class>`` (a ``...ForSemanticSegmentation`` class with ``config`` fields or a config.json path, or a
local ``pretrained`` folder). A builder gets ``num_classes`` and its kwargs and returns a :class:`LibraryModel`,
which maps an image batch to ``{"out": logits (N, K, H, W)}`` at the input's size, as every segprune model does: the
library's own output (HF's ``logits`` at 1/4 resolution, smp's tensor) is adapted here, never by the user.

Nothing is downloaded: smp and timm are built without pretrained weights (a recipe's ``weights`` file loads them),
and ``transformers`` reads ``pretrained`` with ``local_files_only`` and safetensors only. A checkpoint records
``rebuild_kwargs``, which rebuild the same architecture with no file from the user's machine.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch.nn.functional as F
from torch import nn

from segprune._utils import logits


@dataclass(frozen=True)
class Builder:
    build: Callable[..., nn.Module]  # (name, *, num_classes, **kwargs) -> LibraryModel
    package: str  # the import it needs
    extra: str  # the pip extra that installs it


_BUILDERS: dict[str, Builder] = {}


def register_builder(name: str, build: Callable[..., nn.Module], *, package: str, extra: str = "zoo") -> None:
    """Register ``build(name, *, num_classes, **kwargs)`` under ``name`` (the part of a spec before ``:``)."""
    if name in _BUILDERS:
        raise ValueError(f"model builder {name!r} is already registered")
    _BUILDERS[name] = Builder(build, package, extra)


def is_spec(name: str) -> bool:
    """Whether ``name`` names a builder's model (``"smp:Segformer"``) rather than one of segprune's zoo."""
    return ":" in name


def build(spec: str, *, num_classes: int, **kwargs) -> nn.Module:
    """The model of builder spec ``"<builder>:<name>"``.

    Raises:
        ValueError: for an unknown builder, or one whose library is not installed (naming the extra).
    """
    builder_name, _, name = spec.partition(":")
    if builder_name not in _BUILDERS or not name:
        raise ValueError(f"unknown model {spec!r}: a library model is '<builder>:<name>' with builder one of "
                         f"{sorted(_BUILDERS)} (e.g. smp:Segformer, transformers:SegformerForSemanticSegmentation)")
    builder = _BUILDERS[builder_name]
    try:
        importlib.import_module(builder.package)
    except ImportError as err:
        raise ValueError(f"{spec}: {builder.package} is not installed (pip install 'segprune[{builder.extra}]'): "
                         f"{err}") from None
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return builder.build(name, num_classes=num_classes, **kwargs)


def rebuild_kwargs(model: nn.Module, kwargs: dict) -> dict:
    """The kwargs a checkpoint records to build ``model`` again: a library model's own (a ``pretrained`` folder
    becomes its config), else ``kwargs``."""
    return getattr(model, "rebuild_kwargs", None) or kwargs


def library_model(model: nn.Module) -> nn.Module:
    """The library's own module inside a :class:`LibraryModel` (what its weights files are keyed by), or
    ``model``."""
    return model.model if isinstance(model, LibraryModel) else model


class LibraryModel(nn.Module):
    """A library's segmentation model with segprune's output: ``{"out": logits}`` at the input's size."""

    exportable = True
    needs_divisible_input = 1

    def __init__(self, model: nn.Module, rebuild: dict, head: nn.Module | None = None, divisor: int = 1):
        super().__init__()
        self.model, self.head = model, head
        self.rebuild_kwargs, self.needs_divisible_input = rebuild, divisor

    def forward(self, x):
        out = self.model(x)
        if self.head is not None:
            out = self.head(out[-1] if isinstance(out, (list, tuple)) else out)
        out = logits(getattr(out, "logits", out))  # HF's output object holds `logits`
        if out.shape[-2:] != x.shape[-2:]:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"out": out}


def _smp(arch: str, *, num_classes: int, **kwargs) -> LibraryModel:
    import segmentation_models_pytorch as smp

    model = smp.create_model(arch, encoder_weights=None, classes=num_classes, **kwargs)
    # smp's encoders halve the input 5 times (encoder_depth): H and W must be multiples of 2**depth
    return LibraryModel(model, {"num_classes": num_classes, **kwargs},
                        divisor=2 ** kwargs.get("encoder_depth", 5))


def _timm(name: str, *, num_classes: int, **kwargs) -> LibraryModel:
    import timm

    backbone = timm.create_model(name, pretrained=False, features_only=True, out_indices=(-1,), **kwargs)
    channels = backbone.feature_info.channels()[-1]
    return LibraryModel(backbone, {"num_classes": num_classes, **kwargs}, head=nn.Conv2d(channels, num_classes, 1),
                        divisor=backbone.feature_info.reduction()[-1])


def _transformers(cls_name: str, *, num_classes: int, config: dict | None = None, pretrained: str = "",
                  **kwargs) -> LibraryModel:
    import transformers

    cls = getattr(transformers, cls_name, None)
    if not isinstance(cls, type) or not hasattr(cls, "config_class"):
        raise ValueError(f"transformers has no model class {cls_name!r} (e.g. SegformerForSemanticSegmentation)")
    fields = {**_config_fields(config), **kwargs}
    if pretrained:
        try:
            model = cls.from_pretrained(pretrained, local_files_only=True, use_safetensors=True,
                                        num_labels=num_classes, ignore_mismatched_sizes=True, **fields)
        except OSError as err:  # not a folder, no config.json, no safetensors weights, or not in the local cache
            raise ValueError(f"{pretrained}: not a local transformers model with safetensors weights "
                             f"({str(err).splitlines()[0]})") from None
    else:
        cfg = cls.config_class.from_dict(fields)
        cfg.num_labels = num_classes
        model = cls(cfg)
    return LibraryModel(model, {"num_classes": num_classes, "config": model.config.to_dict()})


def _config_fields(config: dict | str | None) -> dict:
    """A transformers config's fields: a mapping, or a config.json file."""
    if not isinstance(config, str):
        return dict(config or {})
    try:
        fields = json.loads(Path(config).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{config}: not a readable config.json ({err})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{config}: a config.json holds one object of fields")
    return fields


register_builder("smp", _smp, package="segmentation_models_pytorch")
register_builder("timm", _timm, package="timm")
register_builder("transformers", _transformers, package="transformers")
