"""`prune(model, example_inputs, ratio=...)`: trace, score, decide, cut, and return model + plan."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from segprune._utils import deprecated
from segprune.prune.cost import CostModel
from segprune.prune.criteria import CRITERIA
from segprune.prune.fold import apply_folds, with_biases
from segprune.prune.graph import ChannelGroup, ChannelGroups, channel_groups
from segprune.prune.latency import LatencyTable, latency_removal
from segprune.prune.plan import Plan
from segprune.prune.select import SELECTIONS, select_target
from segprune.prune.verify import Verification, unfolded, verify_removal


@dataclass
class PruneResult:
    """The pruned model, the plan that made it, the groups it was cut along and what each lost."""

    model: nn.Module
    plan: Plan
    groups: list[ChannelGroup]
    removed: dict[int, np.ndarray]
    verification: Verification | None = None  # what `verify` checked and froze (None: not verified)

    @property
    def channels_removed(self) -> int:
        return int(sum(len(r) for r in self.removed.values()))

    @property
    def channels_prunable(self) -> int:
        return int(sum(g.prunable.sum() for g in self.groups))


def prune(model: nn.Module, example_inputs, *, ratio: float | None = None, target_macs: float | None = None,
          target_params: float | None = None, criterion: str | Callable = "bn_scale", select: str = "global",
          ignore: Sequence[str] = (), min_keep: float = 0.1, round_to: int | None = None, seed: int = 0,
          groups: ChannelGroups | None = None, inplace: bool = False, target_latency: float | None = None,
          latency: LatencyTable | None = None, verify: bool | str = True, allow_approximate: Sequence[str] = (),
          compensate: bool = False, method: str | None = None) -> PruneResult:
    """Remove the channels with the lowest `criterion` scores: a `ratio` of them, or as few as reach a target.

    Args:
        model: any nn.Module whose forward runs on `example_inputs`.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        ratio: fraction of prunable channels to remove, in [0, 1).
        target_macs: instead of `ratio`, remove (along one global threshold) until MACs <= this fraction of the
            original; found by bisection, predicted exactly from the trace.
        target_params: the same for parameters.
        criterion: a name in CRITERIA ("bn_scale", "l1", "l2", "fpgm", "random") or `fn(group, model) -> scores`
            (e.g. a `Taylor` instance).
        select: how channels are chosen for a `ratio`: "global" (one threshold across layers) or "uniform" (the
            same ratio in every group); targets always use the global threshold.
        ignore: module names whose output channels are kept (the model's outputs always are).
        min_keep: per-layer floor, as a fraction of the layer's channels (at least one is always kept).
        round_to: keep every group's channel count a multiple of this (rounded up: fewer removals).
        seed: for the "random" criterion.
        groups: channel groups already computed by `channel_groups` for this model (skips the trace).
        inplace: cut `model` itself instead of a copy.
        target_latency: instead of `ratio`, remove channel blocks by least importance per millisecond saved until
            the latency predicted by `latency` is at most this fraction of the unpruned model's; `round_to`
            defaults to each group's width step measured in the table.
        latency: the `LatencyTable` of this model on the deployment runtime (segprune.eval.latency measures one).
            Importance per millisecond compares layers, so give a `criterion` that estimates the loss change (a
            `segprune.prune.Taylor` on a few batches): weight norms make cheap-looking high-resolution layers
            (the stem) go first (benchmarks/latency_camvid.py).
        verify: check the result against the masked model (float64, on copies) on a 32-pixel crop of
            `example_inputs` (the full inputs if the model does not run on it; "full": always the full inputs);
            groups whose cut is not exact are frozen with a warning and the model is cut again (see
            `result.verification`). False skips the check.
        allow_approximate: ops whose channels may be removed although that is not exact, e.g. ("layer_norm",);
            `result.verification.error` is then the output change measured against the masked model.
        compensate: fold what each removed channel still emits on average (ReLU(beta) of a slimmed BN channel) into
            its consumers' biases, measured on the example inputs; needs `verify`.
        method: the older name of `select` (a recipe's "method" is something else: segprune.workflows.METHODS).
    """
    if method is not None:
        deprecated("prune(method=...)", "use prune(select=...)")
        select = method
    if sum(v is not None for v in (ratio, target_macs, target_params, target_latency)) != 1:
        raise ValueError("give exactly one of ratio, target_macs, target_params, target_latency")
    for name, value in (("target_macs", target_macs), ("target_params", target_params)):
        if value is not None and not 0 < value <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {value}")
    if compensate and not verify:
        raise ValueError("compensate=True measures on the example inputs, which needs verify=True")
    ratio_ok = ratio is None or 0 <= ratio < 1
    if not ratio_ok:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    groups = groups if groups is not None else channel_groups(model, example_inputs, ignore=ignore,
                                                              allow_approximate=allow_approximate)
    if not any(g.prunable.any() for g in groups):
        raise ValueError("the model has no prunable channel (every channel group is frozen)")
    score = _criterion(criterion, seed)
    scores = {g.id: s for g in groups if not g.frozen and (s := score(g, model)) is not None}
    if select not in SELECTIONS:
        raise ValueError(f"unknown selection {select!r}; choose from {sorted(SELECTIONS)}")
    choose = functools.partial(_select, model=model, scores=scores, selection=select, ratio=ratio,
                               target_macs=target_macs, target_params=target_params, min_keep=min_keep,
                               round_to=round_to, target_latency=target_latency, latency=latency)
    removed, verification, checked, folds = choose(groups), None, None, []
    if verify:
        modes = _verify_modes(groups)
        groups, removed, verification, checked, folds = verify_removal(
            model, example_inputs, groups, removed, choose, modes=modes, probe=None if verify == "full" else 32,
            compensate=compensate)
    else:
        groups, removed = unfolded(groups, removed, choose)
    plan = with_biases(Plan.from_removal(model, groups, removed), model, folds)
    pruned = checked if checked is not None and not inplace else plan.apply(
        apply_folds(model if inplace else copy.deepcopy(model), folds))
    return PruneResult(pruned, plan, groups, removed, verification)


def _verify_modes(groups) -> tuple[str, ...]:
    """Eval mode, plus train mode (norms and dropout as in eval) where layers run only in training (auxiliary
    heads); the train pass alone when it runs every op of the eval pass too (half the cost, same coverage)."""
    if not getattr(groups, "train_only", True):
        return ("eval",)
    return ("train",) if getattr(groups, "eval_in_train", False) else ("eval", "train")


def _select(groups, *, model, scores, selection, ratio, target_macs, target_params, min_keep, round_to,
            target_latency=None, latency=None):
    """What to cut from `groups` (their frozen channels excluded): a ratio, or the fewest cuts reaching a target."""
    if target_latency is not None:
        return latency_removal(model, groups, scores, table=latency, target=target_latency, min_keep=min_keep,
                               round_to=round_to)
    if ratio is not None:
        return SELECTIONS[selection](groups, scores, ratio=ratio, min_keep=min_keep, round_to=round_to)
    metric, target = ("macs", target_macs) if target_macs is not None else ("params", target_params)
    cost = CostModel(model, groups)
    return select_target(groups, scores, cost=lambda r: cost.relative(r, metric), target=target,
                         min_keep=min_keep, round_to=round_to)


def _criterion(criterion, seed):
    if callable(criterion):
        return criterion
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose from {sorted(CRITERIA)}")
    fn = CRITERIA[criterion]
    return functools.partial(fn, seed=seed) if criterion == "random" else fn
