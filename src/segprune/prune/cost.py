"""What a removal costs to run and to store, predicted from the trace without building the pruned model.

A layer's MACs and weights scale with the fraction of its output channels kept times the fraction of its
input channels kept (grouped and depthwise convs lose whole groups, so only the output side counts). The
prediction is exact for what `torch.utils.flop_counter` counts (convolutions and linear layers), which is
what lets a target ("MACs <= 50 %") be found by bisection on the pruning threshold.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from segprune.prune.graph import PRODUCERS, ChannelGroups


class CostModel:
    """`cost.macs(removed)` and `cost.params(removed)` for a removal `{group id: channels}`."""

    def __init__(self, model: nn.Module, groups: ChannelGroups):
        self.sides: dict[str, dict[str, tuple[int, np.ndarray]]] = {}
        for g in groups:
            for m in g.members:
                self.sides.setdefault(m.module, {})[m.role] = (g.id, m.index)
        self.module_macs = groups.module_macs
        self.total_macs = groups.total_macs
        self.param_parts = {name: _param_parts(model.get_submodule(name)) for name in self.sides}
        self.total_params = sum(p.numel() for p in model.parameters())

    def _kept(self, removed: dict[int, np.ndarray], module: str, role: str) -> float:
        side = self.sides[module].get(role)
        if side is None or side[0] not in removed:
            return 1.0
        gid, index = side
        return float(np.mean(~np.isin(index, removed[gid])))

    def macs(self, removed: dict[int, np.ndarray]) -> float:
        saved = sum(macs * (1 - self._kept(removed, name, "out") * self._kept(removed, name, "in"))
                    for name, macs in self.module_macs.items() if name in self.sides)
        return self.total_macs - saved

    def params(self, removed: dict[int, np.ndarray]) -> float:
        saved = 0.0
        for name, (both, out_only) in self.param_parts.items():
            kept_out, kept_in = self._kept(removed, name, "out"), self._kept(removed, name, "in")
            saved += both * (1 - kept_out * kept_in) + out_only * (1 - kept_out)
        return self.total_params - saved

    def relative(self, removed: dict[int, np.ndarray], metric: str) -> float:
        """Cost after removal as a fraction of the original ("macs" or "params")."""
        if metric == "macs":
            return self.macs(removed) / max(self.total_macs, 1)
        return self.params(removed) / max(self.total_params, 1)


def _param_parts(module: nn.Module) -> tuple[int, int]:
    """(weights that shrink with both sides, parameters that shrink with the output side only)."""
    both = module.weight.numel() if isinstance(module, PRODUCERS) and module.weight is not None else 0
    total = sum(p.numel() for p in module.parameters(recurse=False))
    return both, total - both
