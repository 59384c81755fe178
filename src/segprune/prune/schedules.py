"""Pruning schedules: when to prune and when to retrain, around the engine's one-shot `prune`.

Miao et al. (2020) replace layer-by-layer prune-and-retrain by a *two-stage global* filter pruning: one ranking of
all prunable filters across layers (L1 norm normalised by filter size, or |gamma|); stage A removes part of the
target and fine-tunes briefly; stage B scores again, removes the rest and fine-tunes. The layer-by-layer baseline
prunes one channel group at a time (every group by the same fraction, found so that the whole model reaches the
target) and retrains after each. Both take a `finetune(model, epochs)` callback and time it, so a benchmark can
compare accuracy against total retraining time. `on_stage(name, before, result)` sees every cut before its
fine-tuning (the masked-equivalence oracle checks `result.model` against `masked_copy(before, result.groups,
result.removed)` there).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from segprune.prune.api import PruneResult, _criterion, prune
from segprune.prune.cost import CostModel
from segprune.prune.criteria import Taylor
from segprune.prune.graph import channel_groups
from segprune.prune.plan import Plan
from segprune.prune.select import removal_order, round_removal, select_uniform

Finetune = Callable[[nn.Module, int], object]
OnStage = Callable[[str, nn.Module, PruneResult], object]


@dataclass
class ScheduleResult:
    """The pruned, fine-tuned model; the plan that replays every cut; one row per stage; retraining seconds."""

    model: nn.Module
    plan: Plan
    stages: list[dict] = field(default_factory=list)  # name, macs (fraction of the original), removed, seconds
    retrain_seconds: float = 0.0


def two_stage_global(model: nn.Module, example_inputs, *, target_macs: float, finetune: Finetune,
                     criterion: str | Callable = "l1", stage_a: float = 0.5, epochs: tuple[int, int] = (1, 1),
                     min_keep: float = 0.1, ignore: Sequence[str] = (), round_to: int | None = None,
                     on_stage: OnStage | None = None) -> ScheduleResult:
    """Two-stage global filter pruning to `target_macs` (a fraction of the original MACs).

    Args:
        model: the trained model (not modified).
        example_inputs: input of one forward pass, for the trace.
        target_macs: MACs after both stages, as a fraction of the original, in (0, 1].
        finetune: `finetune(model, epochs)` retrains in place; its time is `retrain_seconds`.
        criterion: one global ranking by this criterion ("l1": mean |w| of each filter; "bn_scale": |gamma|), or
            `fn(group, model) -> scores` called on the model as it is at each cut (not a `Taylor`, bound to one).
        stage_a: the fraction of the MAC reduction stage A removes, in (0, 1]; stage B removes the rest.
        epochs: fine-tuning epochs after stage A and after stage B.
        min_keep: per-layer floor (fraction of each layer's channels kept).
        ignore: modules whose output channels are kept.
        round_to: keep channel counts multiples of this.
        on_stage: called as `on_stage("A" or "B", model before the cut, PruneResult)` before fine-tuning.
    """
    if not 0 < target_macs <= 1 or not 0 < stage_a <= 1:
        raise ValueError(f"target_macs and stage_a must be in (0, 1], got {target_macs}, {stage_a}")
    _check_criterion(criterion)
    groups = channel_groups(model, example_inputs, ignore=ignore)
    total, current, plan, result = groups.total_macs, model, Plan(), ScheduleResult(model, Plan())
    for name, goal, n_epochs in (("A", 1 - stage_a * (1 - target_macs), epochs[0]), ("B", target_macs, epochs[1])):
        relative = goal * total / max(groups.total_macs, 1)  # the goal as a fraction of the current model
        if relative < 1:
            cut = prune(current, example_inputs, target_macs=relative, criterion=criterion, min_keep=min_keep,
                        round_to=round_to, groups=groups)
            _stage(result, name, current, cut, finetune, n_epochs, on_stage, total)
            current, plan = cut.model, plan.then(cut.plan)
        groups = channel_groups(current, example_inputs, ignore=ignore) if name == "A" else groups
    result.model, result.plan = current, plan
    return result


def layer_by_layer(model: nn.Module, example_inputs, *, target_macs: float, finetune: Finetune,
                   criterion: str | Callable = "l1", epochs_per_layer: int = 1, min_keep: float = 0.1,
                   ignore: Sequence[str] = (), on_stage: OnStage | None = None) -> ScheduleResult:
    """The baseline: prune one channel group at a time, in model order, each by the same fraction of its prunable
    channels (the smallest fraction that brings the whole model to `target_macs`, found by bisection on the
    original), re-scoring the group on the current model, and retrain `epochs_per_layer` after each.

    A uniform ratio moves in coarse steps (each group rounds its count), so the result can end a few percent
    below `target_macs`; and where a group spans layers of different widths (a concat), re-scoring may pick other
    channels than the prediction did, so its MACs can differ slightly from the predicted ones (`stages[-1]["macs"]`
    is exact for what was cut).

    Args: as `two_stage_global`; `on_stage` gets the producer layer of each group as the stage name.
    """
    if not 0 < target_macs <= 1:
        raise ValueError(f"target_macs must be in (0, 1], got {target_macs}")
    _check_criterion(criterion)
    groups = channel_groups(model, example_inputs, ignore=ignore)
    score = _criterion(criterion, 0)
    counts = _uniform_counts(model, groups, score, target_macs, min_keep)
    total, current, plan, result = groups.total_macs, model, Plan(), ScheduleResult(model, Plan())
    for key, n in counts:
        now = channel_groups(current, example_inputs, ignore=ignore)
        group = next(g for g in now if _key(g) == key)
        order = removal_order([group], {group.id: score(group, current)}, min_keep=min_keep)
        removed = {group.id: np.array(sorted(c for _, c in order[:n]), dtype=np.int64)}
        cut_plan = Plan.from_removal(current, now, removed)
        work = copy.deepcopy(current) if current is model or on_stage is not None else current  # on_stage: before
        cut = PruneResult(cut_plan.apply(work), cut_plan, now, removed)
        _stage(result, group.modules("out")[0], current, cut, finetune, epochs_per_layer, on_stage, total)
        current, plan = cut.model, plan.then(cut_plan)
    result.model, result.plan = current, plan
    return result


def _stage(result: ScheduleResult, name: str, before: nn.Module, cut: PruneResult, finetune: Finetune, epochs: int,
           on_stage: OnStage | None, total: int) -> None:
    """Record one cut, show it to `on_stage`, fine-tune and time it."""
    if on_stage is not None:
        on_stage(name, before, cut)
    macs = CostModel(before, cut.groups).macs(cut.removed) / max(total, 1)  # exact, from the trace
    start = time.perf_counter()
    if epochs > 0:
        finetune(cut.model, epochs)
    seconds = time.perf_counter() - start
    result.retrain_seconds += seconds
    result.stages.append({"name": name, "macs": macs, "removed": cut.channels_removed, "seconds": seconds})


def _check_criterion(criterion) -> None:
    """Schedules score every cut on the model as it is then: a criterion bound to one model cannot."""
    if isinstance(criterion, Taylor):
        raise ValueError("a Taylor criterion holds the scores of the model it was built on; schedules re-score "
                         "fine-tuned models: use 'l1' or 'bn_scale', or a function fn(group, model) -> scores")


def _key(group) -> frozenset:
    """A group's identity across cuts of other groups: its members (module, role)."""
    return frozenset((m.module, m.role) for m in group.members)


def _uniform_counts(model, groups, score, target, min_keep) -> list[tuple[frozenset, int]]:
    """(group key, channels to remove) in model order, for the smallest uniform ratio reaching `target`."""
    scores = {g.id: s for g in groups if not g.frozen and (s := score(g, model)) is not None}
    cost = CostModel(model, groups)
    at = lambda r: round_removal(groups, select_uniform(groups, scores, ratio=r, min_keep=min_keep), None)  # noqa: E731
    if cost.relative(at(0.999), "macs") > target:
        raise ValueError(f"target_macs {target:.3f} is out of reach layer by layer: the per-layer floors "
                         f"(min_keep={min_keep}) leave {cost.relative(at(0.999), 'macs'):.3f}")
    lo, hi = 0.0, 0.999
    for _ in range(30):  # bisection on the ratio: cost falls (weakly) as it grows
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cost.relative(at(mid), "macs") <= target else (mid, hi)
    removal = at(hi)
    return [(_key(g), len(removal[g.id])) for g in groups if len(removal.get(g.id, ())) > 0]
