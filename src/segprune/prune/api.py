"""`prune(model, example_inputs, ratio=...)`: trace, score, decide, cut, and return model + plan."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from segprune.prune.criteria import CRITERIA
from segprune.prune.graph import ChannelGroup, channel_groups
from segprune.prune.methods import METHODS
from segprune.prune.plan import Plan


@dataclass
class PruneResult:
    """The pruned model, the plan that made it, the groups it was cut along and what each lost."""

    model: nn.Module
    plan: Plan
    groups: list[ChannelGroup]
    removed: dict[int, np.ndarray]

    @property
    def channels_removed(self) -> int:
        return int(sum(len(r) for r in self.removed.values()))

    @property
    def channels_prunable(self) -> int:
        return int(sum(g.prunable.sum() for g in self.groups))


def prune(model: nn.Module, example_inputs, *, ratio: float, criterion: str | Callable = "bn_scale",
          method: str = "global", ignore: Sequence[str] = (), min_keep: float = 0.1, seed: int = 0,
          groups: list[ChannelGroup] | None = None, inplace: bool = False) -> PruneResult:
    """Remove the `ratio` fraction of prunable channels with the lowest `criterion` scores.

    Args:
        model: any nn.Module whose forward runs on `example_inputs`.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        ratio: fraction of prunable channels to remove, in [0, 1).
        criterion: a name in CRITERIA ("bn_scale", "l1", "l2", "random") or `fn(group, model) -> scores`.
        method: "global" (one threshold across layers) or "uniform" (the same ratio in every group).
        ignore: module names whose output channels are kept (the model's outputs always are).
        min_keep: per-group floor, as a fraction of the group's channels (at least one is always kept).
        seed: for the "random" criterion.
        groups: channel groups already computed by `channel_groups` for this model (skips the trace).
        inplace: cut `model` itself instead of a copy.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    groups = groups if groups is not None else channel_groups(model, example_inputs, ignore=ignore)
    if not any(g.prunable.any() for g in groups):
        raise ValueError("the model has no prunable channel (every channel group is frozen)")
    score = _criterion(criterion, seed)
    scores = {g.id: s for g in groups if not g.frozen and (s := score(g, model)) is not None}
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    removed = METHODS[method](groups, scores, ratio=ratio, min_keep=min_keep)
    plan = Plan.from_removal(model, groups, removed)
    pruned = plan.apply(model if inplace else copy.deepcopy(model))
    return PruneResult(pruned, plan, groups, removed)


def _criterion(criterion, seed):
    if callable(criterion):
        return criterion
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose from {sorted(CRITERIA)}")
    fn = CRITERIA[criterion]
    return functools.partial(fn, seed=seed) if criterion == "random" else fn
