"""The masked-equivalence oracle: the proof that a pruning is exact.

Make the removed channels dead in a copy of the original (BN weight and bias = 0 for every norm in
the group, filter weights and bias = 0 for every producer), then run both on the same input in eval
mode: the physically pruned model must compute what the masked copy computes. The mask is built
from the groups alone, independently of the surgery, so a missed coupling shows up as a difference.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch
from torch import nn

from segprune._utils import tensors
from segprune.prune.criteria import _NORMS
from segprune.prune.graph import PRODUCERS, ChannelGroup
from segprune.prune.replace import replace_module
from segprune.prune.trace import as_call


def masked_copy(model: nn.Module, groups: list[ChannelGroup], removed: dict[int, np.ndarray],
                replace: dict[str, str] | None = None) -> nn.Module:
    """A copy of `model` whose removed channels output zero at every producer and norm; `replace` (a result's
    `plan.replace`) swaps the modules prune swapped first, so that the groups' names exist."""
    masked = copy.deepcopy(model)
    for name, key in (replace or {}).items():
        replace_module(masked, name, key)
    with torch.no_grad():
        for group in groups:
            drop = removed.get(group.id)
            for m in group.members if drop is not None and len(drop) else ():
                _zero(masked.get_submodule(m.module), m.role, torch.from_numpy(np.isin(m.index, drop)))
    return masked


@contextlib.contextmanager
def masked_in_place(model: nn.Module, groups: list[ChannelGroup], removed: dict[int, np.ndarray]):
    """`model` itself with the removed channels zeroed, as in `masked_copy`, restored on exit (no copy made: only
    the zeroed slices are saved)."""
    saved = []
    with torch.no_grad():
        for group in groups:
            drop = removed.get(group.id)
            for m in group.members if drop is not None and len(drop) else ():
                module = model.get_submodule(m.module)
                if m.role != "out" or not isinstance(module, PRODUCERS + _NORMS):
                    continue
                dead = torch.from_numpy(np.flatnonzero(np.isin(m.index, drop)))
                out_dim = 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0
                for t, dim in ((module.weight, out_dim), (module.bias, 0)):
                    if t is not None:
                        index = dead.to(t.device)
                        saved.append((t, dim, index, t.index_select(dim, index)))
                        t.index_fill_(dim, index, 0.0)
    try:
        yield model
    finally:
        with torch.no_grad():
            for t, dim, index, values in reversed(saved):  # a slice saved twice is restored from its first save
                t.index_copy_(dim, index, values)


def _zero(module: nn.Module, role: str, dead: torch.Tensor) -> None:
    if role != "out" or not isinstance(module, PRODUCERS + _NORMS):
        return
    out_dim = 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0
    if module.weight is not None:
        module.weight.data.index_fill_(out_dim, dead.nonzero().flatten(), 0.0)
    if module.bias is not None:
        module.bias.data[dead] = 0.0


def outputs(model: nn.Module, example_inputs) -> list[torch.Tensor]:
    """Every tensor the model returns in eval mode, flattened in order."""
    args, kwargs = as_call(example_inputs)
    model.eval()
    with torch.no_grad():
        return [t.detach() for t in tensors(model(*args, **kwargs))]


def relative_error(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """max |a - b| / max |a| over all outputs (inf when the shapes differ)."""
    if len(reference) != len(other) or any(a.shape != b.shape for a, b in zip(reference, other)):
        return float("inf")
    scale = max(float(a.abs().max()) for a in reference) or 1.0
    return max(float((a - b).abs().max()) for a, b in zip(reference, other)) / scale
