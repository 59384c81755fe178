"""Fold the constant a removed channel still sends into its consumer's bias, where that is exact.

In the masked model a removed channel is zero at its producer; an op that does not map 0 to 0 (zeros.py) turns
it into a constant before the consumer, e.g. sigmoid(0) = 0.5. The pruned model drops the channel, and with it
`W[:, c] * 0.5`. For a linear layer, or a convolution that does not pad with zeros, that term is the same at
every output position and goes into the bias exactly. Everything else (a zero-padded convolution sees the
constant only away from the borders; a value that changes with the input) cannot be folded: those channels are
frozen, with a warning naming the op and the consumer.

The constants are measured, not derived: the masked model runs on the example inputs (and on a second input, to
see that they do not depend on it), with hooks reading each consumer's input on the removed channels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

_CONVS = nn.modules.conv._ConvNd


@dataclass
class Fold:
    """`consumer.bias += W[:, positions] . values` (summed over the kernel), for the removal of `group`."""

    group: int
    consumer: str
    positions: torch.Tensor  # input channels of the consumer, original numbering
    values: torch.Tensor  # the constant each of them carries in the masked model

    def delta(self, module: nn.Module) -> torch.Tensor:
        weight = module.weight.detach()
        columns = weight.index_select(1, self.positions.to(weight.device))
        columns = columns.sum(dim=tuple(range(2, columns.dim()))) if columns.dim() > 2 else columns
        return columns @ self.values.to(columns)


def consumers(groups, removed, offsets: dict[str, str] | None) -> list[tuple[int, str, torch.Tensor]]:
    """(group, consumer, removed input positions) for every consumer that reads a possibly nonzero channel (every
    consumer when `offsets` is None)."""
    found = []
    for g in groups:
        drop = removed.get(g.id)
        if drop is None or not len(drop):
            continue
        for m in g.members:
            if m.role == "in" and (offsets is None or m.module in offsets):
                positions = np.flatnonzero(np.isin(m.index, drop))
                if len(positions):
                    found.append((g.id, m.module, torch.from_numpy(positions)))
    return found


def measure(model: nn.Module, run: Callable[[nn.Module, int], object], wanted, offsets) -> tuple[list[Fold], dict]:
    """Run `model` (already masked) twice through `run(model, which_input)`, read every wanted consumer's input
    on its removed channels, and return the folds and {group: why it cannot be folded}."""
    seen: dict[tuple[str, int], list[torch.Tensor]] = {}
    hooks = [model.get_submodule(name).register_forward_pre_hook(_reader(seen, name, positions, k))
             for k, (gid, name, positions) in enumerate(wanted)]
    try:
        for which in (0, 1):
            run(model, which)
    finally:
        for hook in hooks:
            hook.remove()
    folds, bad = [], {}
    for k, (gid, name, positions) in enumerate(wanted):
        values, why = _constant(seen.get((name, k), []))
        module = model.get_submodule(name)
        if why is None and values.abs().max() > 0 and not foldable(module):
            why = f"{module.__class__.__name__} pads with zeros, so it sees the constant only away from the borders"
        if why is not None:
            bad.setdefault(gid, f"{offsets[name]} feeds {name} nonzero values on removed channels: {why}")
        elif values.abs().max() > 0:
            folds.append(Fold(gid, name, positions, values))
    return folds, bad


def means(model: nn.Module, run: Callable[[nn.Module, int], object], wanted) -> list[Fold]:
    """compensate=True: what each removed channel carries into its consumers in the unpruned model, on average
    (after network slimming a channel with gamma near 0 still emits about ReLU(beta)), as folds for the consumers
    that can hold it in their bias."""
    seen: dict[tuple[str, int], list[torch.Tensor]] = {}
    hooks = [model.get_submodule(name).register_forward_pre_hook(_reader(seen, name, positions, k))
             for k, (gid, name, positions) in enumerate(wanted) if foldable(model.get_submodule(name))]
    try:
        run(model, 0)
    finally:
        for hook in hooks:
            hook.remove()
    return [Fold(gid, name, positions, torch.cat(seen[(name, k)], dim=1).mean(dim=1).double())
            for k, (gid, name, positions) in enumerate(wanted) if (name, k) in seen]


@contextlib.contextmanager
def folded_in_place(model: nn.Module, folds: list[Fold], groups=None):
    """`model` with `folds` (of `groups`) added to its consumers' biases, put back on exit."""
    saved = [(name, model.get_submodule(name).bias) for name in {f.consumer for f in folds}]
    try:
        yield apply_folds(model, folds, groups)
    finally:
        for name, bias in saved:
            model.get_submodule(name).bias = bias


def _reader(seen, name, positions, k):
    def hook(module, args):
        x = args[0]
        dim = 1 if isinstance(module, _CONVS) else x.dim() - 1
        picked = x.detach().index_select(dim, positions.to(x.device)).movedim(dim, 0)
        seen.setdefault((name, k), []).append(picked.reshape(len(positions), -1))

    return hook


def _constant(records: list[torch.Tensor]) -> tuple[torch.Tensor, str | None]:
    if not records:
        return torch.zeros(0), "the consumer did not run"
    values = torch.cat(records, dim=1)
    low, high = values.min(dim=1).values, values.max(dim=1).values
    if ((high - low).abs() > 1e-9 * (1 + high.abs())).any():
        return low, "they vary with the position or the input (not a constant a bias can hold)"
    return low.double(), None


def foldable(module: nn.Module) -> bool:
    """Whether a constant input channel adds the same to every output: a linear layer, or an ungrouped,
    non-transposed convolution that reads no zero padding."""
    if isinstance(module, nn.Linear):
        return True
    if not isinstance(module, _CONVS) or isinstance(module, nn.modules.conv._ConvTransposeNd) or module.groups != 1:
        return False
    return module.padding_mode != "zeros" or not any(module._reversed_padding_repeated_twice)


def apply_folds(model: nn.Module, folds: list[Fold], groups=None) -> nn.Module:
    """Add each fold (of `groups`, or all) to its consumer's bias, creating a bias where there is none. The bias
    is replaced, never written in place: the model may share tensors with the original (verify.converted_copy)."""
    for fold in folds:
        if groups is not None and fold.group not in groups:
            continue
        module = model.get_submodule(fold.consumer)
        delta = fold.delta(module)
        bias = module.bias.detach() if module.bias is not None else torch.zeros_like(delta)
        requires_grad = module.weight.requires_grad if module.bias is None else module.bias.requires_grad
        module.bias = nn.Parameter(bias + delta.to(bias), requires_grad=requires_grad)
    return model


def with_biases(plan, model: nn.Module, folds: list[Fold]):
    """Record in the plan the consumers that gained a bias, so that replaying it on a fresh model makes room for
    the folded bias in the weights."""
    for fold in folds:
        if model.get_submodule(fold.consumer).bias is None:
            plan.modules[fold.consumer]["bias"] = True
    return plan
