"""The sparsity regulariser of network slimming: L1 on BN scales, applied to the gradient.

Call it between `loss.backward()` and `optimizer.step()`: `gamma.grad += lam * sign(gamma)`, the
subgradient of `lam * sum |gamma|`. Passing the channel groups restricts it to BNs whose channels can
actually be pruned (penalising a frozen BN only costs accuracy).
"""

from __future__ import annotations

import torch
from torch import nn

from segprune.prune.criteria import _NORMS
from segprune.prune.graph import ChannelGroup


class BNSparsity:
    """`regularizer(model)` adds `lam * sign(gamma)` to the gradient of every selected norm's weight."""

    def __init__(self, model: nn.Module, *, lam: float, groups: list[ChannelGroup] | None = None):
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.lam = lam
        names = None if groups is None else {m.module for g in groups if not g.frozen for m in g.members}
        self.weights = [m.weight for name, m in model.named_modules()
                        if isinstance(m, _NORMS) and m.weight is not None and (names is None or name in names)]

    @torch.no_grad()
    def __call__(self, model: nn.Module | None = None) -> None:
        for w in self.weights:
            if w.grad is None:
                w.grad = torch.zeros_like(w)
            w.grad.add_(torch.sign(w), alpha=self.lam)
