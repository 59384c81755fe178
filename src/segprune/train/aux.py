"""Auxiliary losses for compression (Miao et al. 2020; PSPNet's deep supervision): small heads on named feature
layers (e.g. a PSPNet's backbone.layer2 and backbone.layer3) add weighted segmentation losses during training and
fine-tuning, and are gone from the deployed model.

Each head is a 3x3 Conv-BN-ReLU and a 1x1 classifier on the layer's output, captured by a forward hook. While
training, the heads are a submodule of the model (`model.segprune_aux`), so that the training loop's optimizer,
`.to(device)` and DDP include them; `remove()` (or leaving the `with` block) deletes them and their hooks, so they
never reach a checkpoint, a pruning trace or an export.

The loss enters through the training loop's `extra_loss(images, output)` hook. That hook does not receive the
targets, so `AuxLoss.criterion(base)` wraps the loop's criterion to note each batch's target (the loop calls the
criterion on the main output first, then `extra_loss`); `extra_loss` refuses a target that was not noted during
the same forward pass, so a changed loop fails loudly instead of pairing features with the wrong labels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segprune._utils import IGNORE_INDEX, eval_mode, logits

ATTRIBUTE = "segprune_aux"


def aux_head(in_channels: int, num_classes: int, mid_channels: int | None = None) -> nn.Sequential:
    """3x3 Conv-BN-ReLU to `mid_channels` (a quarter of the input, at least 8), then a 1x1 classifier."""
    mid = mid_channels or max(8, in_channels // 4)
    return nn.Sequential(nn.Conv2d(in_channels, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                         nn.Conv2d(mid, num_classes, 1))


class AuxLoss:
    """Auxiliary heads on `layers` of `model`, weighted by `weights`, for
    `fit(..., loss=SegmentationLoss(aux.criterion(ce)), extra_loss=aux.extra_loss)`.

    Args:
        model: the model to train; the heads are attached to it until `remove()`.
        layers: qualified names of modules returning a feature map (N, C, H, W).
        weights: one loss weight per layer (>= 0).
        example_inputs: one input batch, run once in eval mode to learn each layer's channels (and the classes).
        num_classes: classes of the heads' logits (default: the channels of the model's logits, `"out"`).
        mid_channels: width of the heads' 3x3 conv (default: a quarter of the layer's channels, at least 8).
        criterion: loss of (logits, target) of the heads; by default the one `criterion()` wraps.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], weights: Sequence[float], *,
                 example_inputs: torch.Tensor, num_classes: int | None = None, mid_channels: int | None = None,
                 criterion: Callable | None = None):
        self.model, self.layers, self.weights = model, list(layers), [float(w) for w in weights]
        _check(model, self.layers, self.weights)
        channels, classes = _channels(model, self.layers, example_inputs)
        num_classes = num_classes or classes
        device = example_inputs.device
        heads = nn.ModuleDict({_key(n): aux_head(channels[n], num_classes, mid_channels) for n in self.layers})
        setattr(model, ATTRIBUTE, heads.to(device=device, dtype=example_inputs.dtype))
        self.heads, self.loss_fn, self.features, self.forward_id, self.noted = heads, criterion, {}, 0, None
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._capture(n)) for n in self.layers]
        self.handles.append(model.register_forward_pre_hook(self._new_forward))

    def _capture(self, name: str):
        def hook(module, args, out):
            if self.model.training:
                self.features[name] = out
        return hook

    def _new_forward(self, module, args):
        self.forward_id += 1
        self.features = {}

    def criterion(self, base: Callable | None = None) -> Callable:
        """The training loop's pixel loss (`base`, cross-entropy ignoring void by default), noting each target."""
        base = base or nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
        self.loss_fn = self.loss_fn or base

        def noting(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            self.noted = (self.forward_id, target)
            return base(logits, target)

        return noting

    def extra_loss(self, images: torch.Tensor, output) -> torch.Tensor:
        """Sum of `weight * loss(head(feature), target)` over the layers, for the forward pass just run."""
        if self.noted is None or self.noted[0] != self.forward_id:
            raise RuntimeError("AuxLoss.extra_loss: no target noted for this forward pass; pass "
                               "criterion=aux.criterion(...) to the training loop together with extra_loss")
        target = self.noted[1]
        missing = [n for n in self.layers if n not in self.features]
        if missing:
            raise RuntimeError(f"AuxLoss: layers {missing} did not run in this forward pass (eval mode?)")
        total = torch.zeros((), device=images.device)
        for name, weight in zip(self.layers, self.weights):
            logits = self.heads[_key(name)](self.features[name])
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
            total = total + weight * self.loss_fn(logits, target)
        self.features = {}
        return total

    def remove(self) -> None:
        """Delete the heads from the model and remove the hooks (the deployed model is as without them)."""
        for handle in self.handles:
            handle.remove()
        self.handles, self.features = [], {}
        if hasattr(self.model, ATTRIBUTE):
            delattr(self.model, ATTRIBUTE)

    def __enter__(self) -> AuxLoss:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def add_losses(*fns: Callable | None) -> Callable | None:
    """One `extra_loss(images, output)` summing several (e.g. distillation and auxiliary heads); None if none."""
    fns = [f for f in fns if f is not None]
    if not fns:
        return None
    return lambda images, output: sum(f(images, output) for f in fns)


def _key(name: str) -> str:
    return name.replace(".", "__")  # ModuleDict keys cannot hold dots


def _check(model: nn.Module, layers: list[str], weights: list[float]) -> None:
    names = {n for n, _ in model.named_modules()}
    unknown = [n for n in layers if n not in names or not n]
    if unknown:
        near = sorted(n for n in names if any(u.split(".")[-1] in n for u in unknown if u))[:6]
        raise ValueError(f"aux_layers: the model has no layer {unknown}" + (f" (similar: {near})" if near else ""))
    if len(weights) != len(layers):
        raise ValueError(f"aux_weights: {len(weights)} weights for {len(layers)} aux_layers {layers}")
    if any(not w >= 0 for w in weights):
        raise ValueError(f"aux_weights must be >= 0, got {weights}")
    if hasattr(model, ATTRIBUTE):
        raise ValueError(f"the model already has auxiliary heads ({ATTRIBUTE}); remove() them first")


def _channels(model: nn.Module, layers: list[str], example_inputs: torch.Tensor) -> tuple[dict[str, int], int]:
    """Each layer's output channels and the number of classes, from one eval-mode forward pass."""
    seen, modules = {}, dict(model.named_modules())

    def hook(name):
        return lambda module, args, out: seen.setdefault(name, out)

    handles = [modules[n].register_forward_hook(hook(n)) for n in layers]
    try:
        with eval_mode(model), torch.no_grad():
            out = model(example_inputs)
    finally:
        for h in handles:
            h.remove()
    for name in layers:
        feature = seen.get(name)
        if not isinstance(feature, torch.Tensor) or feature.dim() != 4:
            what = "did not run" if name not in seen else f"returns {type(feature).__name__}"
            raise ValueError(f"aux_layers: {name} {what}; name a module that returns a feature map (N, C, H, W)")
    return {name: seen[name].shape[1] for name in layers}, logits(out).shape[1]
