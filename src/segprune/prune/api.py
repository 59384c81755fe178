"""`prune(model, example_inputs, ratio=...)`: trace, score, decide, cut, and return model + plan."""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from segprune._utils import deprecated, eval_mode
from segprune.prune.cost import CostModel
from segprune.prune.criteria import CRITERIA
from segprune.prune.fold import apply_folds, with_biases
from segprune.prune.graph import ChannelGroup, ChannelGroups, channel_groups
from segprune.prune.latency import LatencyTable, bracket, latency_removal, next_target
from segprune.prune.oracle import masked_copy
from segprune.prune.plan import Plan
from segprune.prune.replace import replace_module, replaced
from segprune.prune.select import SELECTIONS, select_target
from segprune.prune.trace import as_call
from segprune.prune.verify import Verification, cropped, unfolded, verify_removal

PROBE = 32  # the side of the input crop that verification and module swaps check on (verify.cropped)


@dataclass
class PruneResult:
    """The pruned model, the plan that made it, the groups it was cut along and what each lost."""

    model: nn.Module
    plan: Plan
    groups: list[ChannelGroup]
    removed: dict[int, np.ndarray]
    verification: Verification | None = None  # what `verify` checked and froze (None: not verified)
    latency: dict | None = None  # target_latency with `measure`: the target, every try, and whether it was met

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
          compensate: bool = False, measure: Callable[[nn.Module], float | dict] | None = None,
          latency_tries: int = 5, latency_tolerance: float = 0.05, replace: bool = True, rescore: int = 1,
          method: str | None = None) -> PruneResult:
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
            "weight_standardization": timm's weight-standardised convs are first swapped for plain convs holding
            the standardised weight (same outputs; then exact; fine-tuning no longer standardises; replace.py).
        measure: with `target_latency`, close the loop: `measure(pruned)` returns the pruned model's measured
            latency as a fraction of the unpruned model's (a float, or a dict with "ratio"; e.g.
            `segprune.eval.latency.LatencyMeter` on the deployment runtime); the allocation is corrected by what
            was measured and repeated until the measured ratio is within `latency_tolerance` of the target either
            way (the loop aims inside half of it and reads a try near the band's edge again, so that measuring the
            result once more stays inside; see `closed_loop`). Every try is recorded in `result.latency`; a miss
            after `latency_tries` warns by how much.
        latency_tries: most allocations (and measurements) with `measure`.
        latency_tolerance: relative: 0.05 accepts 0.475-0.525 for a target of 0.5.
        compensate: fold what each removed channel still emits on average (ReLU(beta) of a slimmed BN channel) into
            its consumers' biases, measured on the example inputs; needs `verify`.
        replace: swap modules the engine cannot cut in place for registered equivalents first
            (`nn.MultiheadAttention` -> `SplitMultiheadAttention`, checked on `example_inputs`; see replace.py);
            the plan records the swaps. Not with `groups` (they were traced on the model as it is).
        rescore: allocate in this many steps towards the target (what is kept shrinking geometrically), scoring
            again before each step on the model masked by the one before: one-shot first-order scores (Taylor) add
            up channels' losses one by one and miss that the last channels of a narrowing layer matter more, so
            an aggressive one-shot target can narrow a high-resolution layer to a bottleneck; re-scoring sees it
            (Molchanov et al. 2019 prune iteratively). A `Taylor` is re-accumulated on the masked model (its
            `on`); weight criteria score the masked weights. 1: one shot.
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
    swaps = {}
    if replace and groups is None:
        model, swaps = _replaced(model, example_inputs, inplace, allow_approximate)
    groups = groups if groups is not None else channel_groups(model, example_inputs, ignore=ignore,
                                                              allow_approximate=allow_approximate)
    if not any(g.prunable.any() for g in groups):
        raise ValueError("the model has no prunable channel (every channel group is frozen)")
    score = _criterion(criterion, seed)
    scores = _scores(groups, score, model)
    if select not in SELECTIONS:
        raise ValueError(f"unknown selection {select!r}; choose from {sorted(SELECTIONS)}")
    if rescore < 1:
        raise ValueError(f"rescore must be >= 1 (allocation steps), got {rescore}")
    steps = {} if rescore == 1 else dict(steps=rescore, score=score)
    choose = functools.partial(_rescored if steps else _select, model=model, scores=scores, selection=select,
                               ratio=ratio, target_macs=target_macs, target_params=target_params, min_keep=min_keep,
                               round_to=round_to, target_latency=target_latency, latency=latency, **steps)
    if target_latency is not None and measure is not None:
        cut = lambda target: _cut(model, example_inputs, groups, functools.partial(choose, target_latency=target),
                                  verify, compensate, inplace=False)  # noqa: E731
        result = closed_loop(cut, measure, target=target_latency, table=latency, tries=latency_tries,
                             tolerance=latency_tolerance)
    else:
        result = _cut(model, example_inputs, groups, choose, verify, compensate, inplace, private=bool(swaps))
    result.plan.replace = swaps
    return result


def _replaced(model, example_inputs, inplace, allow=()) -> tuple[nn.Module, dict[str, str]]:
    """The model with its registered modules swapped (replace.py): a copy, or `model` itself when `inplace`."""
    probes = [cropped(example_inputs, PROBE), example_inputs]  # a wrong swap is wrong at any size: check a crop

    def call(m):
        while True:
            args, kwargs = as_call(probes[0])
            try:
                with eval_mode(m):
                    return m(*args, **kwargs)
            except Exception:
                if m is not model or len(probes) == 1:  # only the original model chooses the inputs
                    raise
                probes.pop(0)  # the model cannot run on the crop (a fixed input size)

    new, swaps = replaced(model, call, allow)
    if inplace:
        for name, key in swaps.items():
            replace_module(model, name, key)
        return model, swaps
    return new, swaps


def _cut(model, example_inputs, groups, choose, verify, compensate, inplace, private=False) -> PruneResult:
    """Choose what to cut, verify it against the masked model (freezing what fails), and cut: the verified copy
    when there is one, else `model` itself when `inplace` or `private` (a copy prune made: modules swapped)."""
    removed, verification, checked, folds = choose(groups), None, None, []
    if verify:
        modes = _verify_modes(groups)
        groups, removed, verification, checked, folds = verify_removal(
            model, example_inputs, groups, removed, choose, modes=modes, probe=None if verify == "full" else PROBE,
            compensate=compensate)
    else:
        groups, removed = unfolded(groups, removed, choose)
    plan = with_biases(Plan.from_removal(model, groups, removed), model, folds)
    pruned = checked if checked is not None and not inplace else plan.apply(
        apply_folds(model if inplace or private else copy.deepcopy(model), folds))
    return PruneResult(pruned, plan, groups, removed, verification)


def closed_loop(cut: Callable[[float], PruneResult], measure, *, target: float, table: LatencyTable, tries: int,
                tolerance: float, repeats: int = 3) -> PruneResult:
    """Allocate for `target`, measure, correct the allocation's target by what was measured (:func:`next_target`),
    until the measured ratio is within half the `tolerance` of `target`; the closest try is returned (met when
    within `tolerance`), with every try in `result.latency` and a warning when none was close enough.

    Why half: one reading of a shared machine is noisy by a few per cent, so a try accepted at the band's edge is
    often outside it when measured again. Aiming inside half the band, and reading a try up to `repeats` times
    (the mean ratio) while it lands near the band's edge (:func:`_read`), keeps the result inside the band when
    the user re-measures it."""
    record, best, aim = [], None, target
    for _ in range(max(1, tries)):
        try:
            result = cut(aim)
        except ValueError as err:  # a corrected aim beyond what the floors allow: the closest try so far stands
            if not record:
                raise
            record.append({"allocated_for": round(aim, 4), "error": str(err).split(":")[0]})
            break
        got = _read(measure, result.model, target, tolerance, repeats)
        record.append({"allocated_for": round(aim, 4), "predicted": round(table.ratio_of(result.model), 4),
                       "measured": round(got["ratio"], 4), **{k: v for k, v in got.items() if k != "ratio"}})
        if best is None or abs(got["ratio"] - target) < abs(best[1] - target):
            best = (result, got["ratio"])
        if abs(got["ratio"] / target - 1) <= tolerance / 2:
            break
        aim = next_target([(t["allocated_for"], t["measured"]) for t in record if "measured" in t], target)
        if aim is None:
            break
    result, reached = best
    met = abs(reached / target - 1) <= tolerance
    result.latency = {"target": target, "tolerance": tolerance, "measured_ratio": reached, "met": met,
                      "runtime": table.meta.get("runtime"), "tries": record}
    if not met:
        warnings.warn(f"segprune: target_latency {target:.3f} missed: the closest of {len(record)} tries measured "
                      f"{reached:.3f} ({reached / target - 1:+.1%}; tolerance {tolerance:.0%}). "
                      + _miss_reason(record, target, tolerance), stacklevel=3)
    return result


def _read(measure, model: nn.Module, target: float, tolerance: float, repeats: int) -> dict:
    """`measure(model)`, read again (up to `repeats` readings, their mean ratio; each ratio in "readings") while
    the mean is off `target` by more than half the `tolerance` but not more than twice it: there one reading's
    noise decides whether the try is accepted, and a mean of n readings is √n times less noisy."""
    readings = []
    while True:
        got = measure(model)
        got = got if isinstance(got, dict) else {"ratio": float(got)}
        readings.append(float(got["ratio"]))
        off = abs(sum(readings) / len(readings) / target - 1)
        if len(readings) >= repeats or not tolerance / 2 < off <= 2 * tolerance:
            break
    got = {**got, "ratio": sum(readings) / len(readings)}
    return got if len(readings) == 1 else {**got, "readings": [round(r, 4) for r in readings]}


def _miss_reason(record: list[dict], target: float, tolerance: float) -> str:
    aims = [t["allocated_for"] for t in record]
    if any("error" in t for t in record):
        return f"A corrected allocation was out of reach ({record[-1]['error']})."
    if len(set(aims)) < len(aims):
        return "The allocation cannot move in steps small enough (the channel blocks of the table's width steps)."
    step = _latency_step(record, target, tolerance)
    if step:
        (a0, m0), (a1, m1) = step
        return (f"The runtime's latency jumps between allocations {a0:.3f} and {a1:.3f} (measured {m0:.3f} and "
                f"{m1:.3f}): no allocation between them lands inside the band (the compiled model switches kernels "
                f"there); target one side of the step, or change the widths' rounding (round_to).")
    spread = max((t.get("spread", 0.0) for t in record), default=0.0)
    if spread > 0.05:
        return f"The measurements spread by {spread:.0%}: the machine is probably under load."
    return "The table's predictions disagree with the measurements more than the tries could correct."


def _latency_step(record: list[dict], target: float, tolerance: float):
    """The tightest bracket of tries by allocation, ((a0, m0), (a1, m1)), when it is a step: allocations within
    0.02 of each other whose readings straddle the band by more than twice its width; else None."""
    found = bracket([(t["allocated_for"], t["measured"]) for t in record if "measured" in t], target)
    if not found:
        return None
    (a0, m0), (a1, m1) = found
    return found if 0 < a1 - a0 <= 0.02 and m1 - m0 > 4 * tolerance * target else None


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


def _rescored(groups, *, steps, score, model, scores, ratio, target_macs, target_params, target_latency=None,
              **select):
    """`_select` reached in `steps` steps: step i keeps (what the target keeps) ** (i / steps), scored on the model
    masked by step i - 1's removal (which scores 0 there, so it is removed again: the removal only grows)."""
    removed = {}
    for i in range(1, steps + 1):
        f = i / steps
        if removed:
            masked = masked_copy(model, groups, removed)
            scores = _scores(groups, score.on(masked) if hasattr(score, "on") else score, masked, among=scores)
            for gid, drop in removed.items():
                if gid in scores:
                    scores[gid][drop] = 0.0
        removed = _select(groups, model=model, scores=scores, ratio=None if ratio is None else 1 - (1 - ratio) ** f,
                          target_macs=_power(target_macs, f), target_params=_power(target_params, f),
                          target_latency=_power(target_latency, f), **select)
    return removed


def _scores(groups, score, model, among=None) -> dict[int, np.ndarray]:
    """{group id: `score(group, model)`} of the groups not frozen (or of those in `among`) that it scores."""
    return {g.id: s for g in groups if (g.id in among if among is not None else not g.frozen)
            and (s := score(g, model)) is not None}


def _power(target, f):
    return None if target is None else target ** f


def _criterion(criterion, seed):
    if callable(criterion):
        return criterion
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose from {sorted(CRITERIA)}")
    fn = CRITERIA[criterion]
    return functools.partial(fn, seed=seed) if criterion == "random" else fn
