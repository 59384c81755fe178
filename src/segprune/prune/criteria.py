"""Criteria score the channels of one group: `criterion(group, model) -> scores` (one per channel,
higher = more important), or None when the criterion cannot score that group (bn_scale on a group
without BatchNorm). Scores of a channel held by several members are averaged over all its positions:
a residual stream's channel is as important as its mean |gamma| across the blocks it joins.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from segprune.prune.graph import ChannelGroup

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm)


def _per_channel(size: int, index: list[np.ndarray], values: list[np.ndarray]) -> np.ndarray:
    """Mean of `values` over every position each channel holds."""
    idx, val = np.concatenate(index), np.concatenate(values)
    counts = np.bincount(idx, minlength=size)
    return np.bincount(idx, weights=val, minlength=size) / np.maximum(counts, 1)


def bn_scale(group: ChannelGroup, model: nn.Module) -> np.ndarray | None:
    """|gamma| of the norm layers in the group (network slimming, Liu et al. 2017)."""
    index, values = [], []
    for m in group.members:
        module = model.get_submodule(m.module)
        if m.role == "out" and isinstance(module, _NORMS) and module.weight is not None:
            index.append(m.index)
            values.append(module.weight.detach().abs().double().cpu().numpy())
    return _per_channel(group.size, index, values) if index else None


def _filters(module: nn.Module) -> torch.Tensor | None:
    """The producer's weights as (output channel, everything else), or None if it is not a producer."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return module.weight.detach().transpose(0, 1).flatten(1)
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        return module.weight.detach().flatten(1)
    return None


def _filter_norm(group: ChannelGroup, model: nn.Module, p: int) -> np.ndarray | None:
    index, values = [], []
    for m in group.members:
        weights = _filters(model.get_submodule(m.module)) if m.role == "out" else None
        if weights is not None:  # normalised by filter size so that layers of different fan-in compare
            norm = weights.abs().mean(1) if p == 1 else weights.pow(2).mean(1).sqrt()
            index.append(m.index)
            values.append(norm.double().cpu().numpy())
    return _per_channel(group.size, index, values) if index else None


def l1(group: ChannelGroup, model: nn.Module) -> np.ndarray | None:
    """Mean |w| of each output filter (Li et al. 2017, normalised by filter size)."""
    return _filter_norm(group, model, 1)


def l2(group: ChannelGroup, model: nn.Module) -> np.ndarray | None:
    """Root-mean-square of each output filter."""
    return _filter_norm(group, model, 2)


def random(group: ChannelGroup, model: nn.Module, *, seed: int = 0) -> np.ndarray:
    """Uniform random scores, reproducible per (seed, group)."""
    return np.random.default_rng([seed, group.id]).random(group.size)


CRITERIA = {"bn_scale": bn_scale, "l1": l1, "l2": l2, "random": random}
