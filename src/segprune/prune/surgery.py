"""Surgery: physically remove channels from one module.

One small function per layer type, in one table keyed by type. `out` and `in_` are the kept indices
(original numbering) of the module's output and input channels, or None to leave that side alone.
Users extend the table with `register_surgery(MyLayer, fn)`; a layer type that is not in the table is
never cut (the tracer freezes its channels and says so).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

SURGERY: dict[type, Callable] = {}


def register_surgery(layer_type: type, fn: Callable | None = None):
    """Register `fn(module, out, in_)` as the surgery for `layer_type` (usable as a decorator)."""
    if fn is None:
        return lambda f: register_surgery(layer_type, f)
    SURGERY[layer_type] = fn
    return fn


def surgery_for(module: nn.Module) -> Callable | None:
    """The surgery for a module's type, found along its class hierarchy (subclasses inherit it)."""
    for cls in type(module).__mro__:
        if cls in SURGERY:
            return SURGERY[cls]
    return None


def _keep(module: nn.Module, name: str, index: torch.Tensor, dim: int) -> None:
    """Replace parameter or buffer `name` by its slice along `dim`, keeping its kind and requires_grad."""
    old = getattr(module, name)
    if old is None:
        return
    new = old.detach().index_select(dim, index.to(old.device))  # a new tensor already: no clone
    if isinstance(old, nn.Parameter):
        new = nn.Parameter(new, requires_grad=old.requires_grad)
    setattr(module, name, new)


@register_surgery(nn.modules.conv._ConvNd)
def prune_conv(module, out=None, in_=None):
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    out_dim, in_dim = (1, 0) if transposed else (0, 1)
    if out is not None:
        per_group_out, per_group_in = module.out_channels // module.groups, module.in_channels // module.groups
        _keep(module, "weight", out, out_dim)
        _keep(module, "bias", out, 0)
        module.out_channels = len(out)
        if module.groups > 1:  # whole conv groups were removed (the tracer couples a group's ins and outs)
            module.groups = len(out) // per_group_out
            module.in_channels = module.groups * per_group_in
    if in_ is not None:
        _keep(module, "weight", in_, in_dim)
        module.in_channels = len(in_)


@register_surgery(nn.Linear)
def prune_linear(module, out=None, in_=None):
    if out is not None:
        _keep(module, "weight", out, 0)
        _keep(module, "bias", out, 0)
        module.out_features = len(out)
    if in_ is not None:
        _keep(module, "weight", in_, 1)
        module.in_features = len(in_)


@register_surgery(nn.modules.batchnorm._NormBase)
def prune_norm(module, out=None, in_=None):
    """BatchNorm and InstanceNorm: affine parameters and running statistics."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        _keep(module, name, out, 0)
    module.num_features = len(out)


@register_surgery(nn.GroupNorm)
def prune_group_norm(module, out=None, in_=None):
    per_group = module.num_channels // module.num_groups
    _keep(module, "weight", out, 0)
    _keep(module, "bias", out, 0)
    module.num_channels = len(out)
    module.num_groups = len(out) // per_group


@register_surgery(nn.PReLU)
def prune_prelu(module, out=None, in_=None):
    if module.num_parameters > 1:
        _keep(module, "weight", out, 0)
        module.num_parameters = len(out)


@register_surgery(nn.RMSNorm)
@register_surgery(nn.LayerNorm)
def prune_layer_norm(module, out=None, in_=None):
    """Over the channels only (the tracer binds nothing else): affine parameters and the normalised shape."""
    _keep(module, "weight", out, 0)
    _keep(module, "bias", out, 0)
    module.normalized_shape = (len(out),)
