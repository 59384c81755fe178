"""Criteria score the channels of one group: `criterion(group, model) -> scores` (one per channel,
higher = more important), or None when the criterion cannot score that group (bn_scale on a group
without BatchNorm). Scores of a channel held by several members are averaged over all its positions:
a residual stream's channel is as important as its mean |gamma| across the blocks it joins.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from segprune.prune.graph import PRODUCERS, ChannelGroup

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


def fpgm(group: ChannelGroup, model: nn.Module) -> np.ndarray | None:
    """Filter pruning via geometric median (He et al. 2019): a filter's distance to the other filters of its layer;
    the filters nearest the geometric median are the most replaceable and go first.

    Normalised so that layers compare under one global threshold, as the filter norms are: the mean distance to
    the layer's other filters (not the sum, which grows with the layer's width) per weight (divided by the square
    root of the filter size, which the distance grows with). The paper ranks within each layer, where this
    changes nothing; without it a global threshold cuts narrow layers and layers of small fan-in first."""
    index, values = [], []
    for m in group.members:
        weights = _filters(model.get_submodule(m.module)) if m.role == "out" else None
        if weights is not None and weights.shape[0] > 1:
            w = weights.double()[None]
            distance = torch.cdist(w, w)[0].sum(1) / (weights.shape[0] - 1) / weights.shape[1] ** 0.5
            index.append(m.index)
            values.append(distance.cpu().numpy())
    return _per_channel(group.size, index, values) if index else None


class Taylor:
    """First-order Taylor importance (Molchanov et al. 2019): |sum over pixels of a * dL/da| of each channel's
    activation, averaged over the batches given, for every layer that produces or normalises the channel.

    `Taylor(model, batches, loss_fn)` accumulates once, on first use; then it is a criterion like the others.
    `loss_fn(output, target) -> loss`; `batches` yields (input, target).
    """

    def __init__(self, model: nn.Module, batches, loss_fn):
        self.model, self.batches, self.loss_fn = model, batches, loss_fn
        self.scores: dict[str, torch.Tensor] | None = None

    def _accumulate(self) -> dict[str, torch.Tensor]:
        sums: dict[str, torch.Tensor] = {}
        steps = 0

        def hook(name):
            def forward_hook(module, args, out):
                if isinstance(out, torch.Tensor) and out.requires_grad and out.dim() >= 2:
                    channels_last = isinstance(module, nn.Linear)  # tokens (N, L, C): a linear's features are last
                    a = out.detach()  # not `out` in the hook: out -> its hook -> out is a cycle holding the graph
                    out.register_hook(lambda g: _add(sums, name, _per_sample(a * g, channels_last)))
            return forward_hook

        handles = [m.register_forward_hook(hook(n)) for n, m in self.model.named_modules()
                   if isinstance(m, _NORMS + PRODUCERS)]
        try:
            for inputs, target in self.batches:
                self.model.zero_grad(set_to_none=True)
                self.loss_fn(self.model(inputs), target).backward()
                steps += 1
        finally:
            for h in handles:
                h.remove()
            self.model.zero_grad(set_to_none=True)
        return {name: total / max(steps, 1) for name, total in sums.items()}

    def on(self, model: nn.Module) -> Taylor:
        """The same importance on another model (the same batches and loss): `prune(rescore=N)` re-scores on the
        model masked by its earlier steps."""
        return Taylor(model, self.batches, self.loss_fn)

    def __call__(self, group: ChannelGroup, model: nn.Module) -> np.ndarray | None:
        if self.scores is None:
            self.scores = self._accumulate()
        index, values = [], []
        for m in group.members:
            if m.role == "out" and m.module in self.scores:
                index.append(m.index)
                values.append(self.scores[m.module].double().cpu().numpy())
        return _per_channel(group.size, index, values) if index else None


def _per_sample(a_grad: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """|sum of a * dL/da over every position| as (batch, channels); channels at dim 1, or last for a linear."""
    if channels_last:
        a_grad = a_grad.movedim(-1, 1)
    return a_grad.flatten(2).sum(-1).abs() if a_grad.dim() > 2 else a_grad.abs()


def _add(sums: dict, name: str, per_sample: torch.Tensor) -> None:
    """Sum a (batch, channels) importance over the batch into sums[name]."""
    total = per_sample.sum(0)
    sums[name] = sums[name] + total if name in sums else total


def random(group: ChannelGroup, model: nn.Module, *, seed: int = 0) -> np.ndarray:
    """Uniform random scores, reproducible per (seed, group)."""
    return np.random.default_rng([seed, group.id]).random(group.size)


CRITERIA = {"bn_scale": bn_scale, "l1": l1, "l2": l2, "fpgm": fpgm, "random": random}
