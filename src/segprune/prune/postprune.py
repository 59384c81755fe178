"""Post-pruning, decision-tree style (Liu 2021, reconstructed in METHODS.md section 4).

As a decision tree is grown fully and then cut back along a cost-complexity path, the trained network is cut
back along a *weakest-link path*: every step removes the batch of channels with the smallest
``g = dL / dMACs`` (loss increase on a pruning split per multiply-accumulate saved), re-scores what is left
and repeats, so each sub-network contains the next (the path is nested). ``dL`` is the first-order Taylor
estimate ``|a * dL/da|`` (`criteria.Taylor`) or, for small models, the exact loss increase when the channel
is masked ("ablation"); ``dMACs`` is exact under `cost.CostModel`. Each step records alpha (the batch's
``sum dL / sum dMACs``), MACs, parameters, validation mIoU and the cumulative `Plan`, so any step can be
rebuilt from the unpruned model. `select` then picks the smallest sub-network within delta of the best
validation mIoU (or by the one-standard-error rule), which is retrained.

``selector="lasso"`` keeps the path's ranking to decide how many channels each group loses, but chooses
*which* ones by He et al.'s LASSO and refits the consuming convolution by least squares (`lasso.py`),
wherever the group feeds exactly one plain convolution.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segprune._utils import IGNORE_INDEX, logits
from segprune.prune.cost import CostModel
from segprune.prune.criteria import Taylor
from segprune.prune.graph import ChannelGroup, ChannelGroups, channel_groups
from segprune.prune.lasso import Reconstruction, apply_reconstruction, consumer_of, select_channels
from segprune.prune.oracle import _zero
from segprune.prune.plan import Plan
from segprune.prune.select import removal_order
from segprune.prune.trace import as_call

FORMAT = "segprune.path/1"
POSTPRUNE_SCORES = ("taylor", "ablation")  # how a path step scores dL per channel (not prune.criteria)
SELECTORS = ("rank", "lasso")


def default_loss(output, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the main logits (a tensor or the "out" entry of a dict), ignoring ``IGNORE_INDEX``."""
    return F.cross_entropy(logits(output), target, ignore_index=IGNORE_INDEX)


@dataclass
class PathStep:
    """One sub-network of the path. `plan` cuts the *unpruned* model to it; `removed` counts channels."""

    alpha: float
    macs: int
    params: int
    miou: float
    miou_se: float | None
    removed: int
    plan: Plan = field(repr=False)

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "macs": self.macs, "params": self.params, "miou": self.miou,
                "miou_se": self.miou_se, "removed": self.removed, "plan": json.loads(self.plan.to_json())}


@dataclass
class PruningPath:
    """The nested sequence of sub-networks, step 0 being the unpruned model.

    `weights[i]`, when kept (always with recovery or the LASSO selector, which change weights), is step i's
    state dict; without it a step's weights are the unpruned model's, cut by its plan.
    """

    steps: list[PathStep]
    criterion: str = "taylor"
    selector: str = "rank"
    weights: list[dict[str, torch.Tensor]] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.steps)

    def model_at(self, i: int, base_model: nn.Module) -> nn.Module:
        """Step `i` rebuilt from a fresh copy of the unpruned `base_model` (which is left untouched)."""
        model = self.steps[i].plan.apply(copy.deepcopy(base_model))
        if self.weights is not None:
            model.load_state_dict(self.weights[i])
        return model

    def to_dict(self, selected: int | None = None) -> dict:
        base = self.steps[0]
        return {"format": FORMAT, "criterion": self.criterion, "selector": self.selector, "selected": selected,
                "total_macs": base.macs, "total_params": base.params,
                "steps": [{"index": i, "macs_ratio": s.macs / max(base.macs, 1), **s.to_dict()}
                          for i, s in enumerate(self.steps)]}

    def save(self, file: str | Path, *, selected: int | None = None) -> None:
        """Write the path (without weights) as JSON, atomically."""
        file = Path(file)
        tmp = file.with_name(file.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(selected), indent=1) + "\n")
        tmp.replace(file)

    @classmethod
    def load(cls, file: str | Path) -> PruningPath:
        try:
            data = json.loads(Path(file).read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"{file}: not a segprune path (expected format {FORMAT!r})")
            steps = [PathStep(s["alpha"], s["macs"], s["params"], s["miou"], s["miou_se"], s["removed"],
                              Plan.from_json(json.dumps(s["plan"])))  for s in data["steps"]]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{file}: corrupt path ({err})") from err
        return cls(steps, data.get("criterion", "taylor"), data.get("selector", "rank"))


def removed_channels(plan: Plan, groups: Sequence[ChannelGroup]) -> dict[int, np.ndarray]:
    """The channels (per group of the *unpruned* model) that `plan` removes: what the oracle masks."""
    removed = {}
    for g in groups:
        gone = set()
        for m in g.members:
            kept = plan.modules.get(m.module, {}).get(m.role)
            if kept is not None:
                gone.update(np.delete(m.index, kept).tolist())
        if gone:
            removed[g.id] = np.array(sorted(gone), dtype=np.int64)
    return removed


# --- the path -----------------------------------------------------------------------------------------------
def pruning_path(model: nn.Module, example_inputs, prune_batches, val_fn: Callable, *, step: float | int = 0.05,
                 criterion: str = "taylor", selector: str = "rank", recover: Callable[[nn.Module], None] | None = None,
                 min_macs: float = 0.1, min_keep: float = 0.1, ignore: Sequence[str] = (),
                 loss_fn: Callable = default_loss, max_steps: int = 200, keep_weights: bool = False,
                 lasso_samples: int = 2000, log: Callable[[str], None] | None = None) -> PruningPath:
    """Walk the weakest-link path from `model` (left untouched) down to `min_macs` of its MACs.

    Args:
        model: the trained, unpruned network.
        example_inputs: input for tracing (a tensor, tuple or dict, as for `channel_groups`).
        prune_batches: the pruning split, a list of (input, target) batches scored at every step.
        val_fn: `val_fn(model) -> mIoU` or a dict with "miou" and optionally "miou_se" (standard error) or
            "per_image" (per-image mIoUs, from which the standard error is computed), for the 1-SE rule.
        step: a float in (0, 1): each step removes about this fraction of the original MACs; an int >= 1:
            this many channels per step.
        criterion: "taylor" (first-order, one backward pass per batch) or "ablation" (exact loss increase of
            each channel masked alone: one forward pass over the split per channel, small models only).
        selector: "rank" (remove the weakest by g) or "lasso" (the ranking sets how many each group loses,
            He et al.'s LASSO chooses which, and the consuming conv is refitted).
        recover: called on the pruned model after every step (brief fine-tuning), or None.
        min_macs: stop once the MACs are at most this fraction of the original (with a float `step`: at most
            half a step above it).
        min_keep: per-layer floor, as in `prune`.
        ignore: modules whose output channels are kept.
        loss_fn: `loss_fn(output, target) -> loss` for Taylor and ablation.
        max_steps: stop after this many steps whatever the MACs.
        keep_weights: keep every step's state dict (implied by `recover` and by the LASSO selector).
        lasso_samples: positions sampled per layer for LASSO and least squares.
        log: called with one line per step.
    """
    batches = _checked_batches(prune_batches)
    _check(step, criterion, selector, min_macs)
    keep_weights = keep_weights or recover is not None or selector == "lasso"
    current = copy.deepcopy(model).eval()
    groups = _groups(current, example_inputs, ignore)
    total = groups.total_macs
    plan, removed = Plan(), 0
    steps = [_record(current, groups, val_fn, alpha=0.0, plan=plan, removed=0)]
    weights = [_state(current)] if keep_weights else None
    # a float step stops within half a step of min_macs rather than adding slivers of a few channels
    floor = min_macs * total + (0 if isinstance(step, int) else step * total / 2)
    while len(steps) <= max_steps and steps[-1].macs > floor:
        budget = step if isinstance(step, int) else min(step * total, steps[-1].macs - min_macs * total)
        batch, alpha = _weakest_batch(current, groups, batches, criterion, loss_fn, budget, min_keep)
        if not batch:
            break
        recon = {}
        if selector == "lasso":
            batch, recon = _lasso_reselect(current, groups, batch, batches, lasso_samples)
        cut = Plan.from_removal(current, groups, batch)
        cut.apply(current)
        apply_reconstruction(current, recon, cut)
        plan, removed = plan.then(cut), removed + sum(len(c) for c in batch.values())
        if recover is not None:
            recover(current)
            current.eval()
        groups = _groups(current, example_inputs, ignore)
        steps.append(_record(current, groups, val_fn, alpha=alpha, plan=plan, removed=removed))
        if weights is not None:
            weights.append(_state(current))
        if log:
            s = steps[-1]
            log(f"    path step {len(steps) - 1}: removed {removed} channels, MACs {s.macs / total:.3f}, "
                f"alpha {alpha:.3g}, mIoU {s.miou:.4f}")
    return PruningPath(steps, criterion, selector, weights)


def _checked_batches(prune_batches) -> list:
    batches = list(prune_batches)
    if not batches:
        raise ValueError("the pruning split is empty: pruning_path needs at least one (input, target) batch to "
                         "score channels on")
    return batches


def _check(step, criterion: str, selector: str, min_macs: float) -> None:
    if isinstance(step, bool) or not (isinstance(step, int) and step >= 1 or isinstance(step, float) and 0 < step < 1):
        raise ValueError(f"step must be a fraction of the MACs in (0, 1) or a channel count >= 1, got {step!r}")
    if criterion not in POSTPRUNE_SCORES:
        raise ValueError(f"unknown path criterion {criterion!r}; choose from {', '.join(POSTPRUNE_SCORES)}")
    if selector not in SELECTORS:
        raise ValueError(f"unknown selector {selector!r}; choose from {', '.join(SELECTORS)}")
    if not 0 <= min_macs < 1:
        raise ValueError(f"min_macs must be in [0, 1), got {min_macs}")


def _groups(model: nn.Module, example_inputs, ignore) -> ChannelGroups:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frozen-op warnings were given when the model was first traced
        return channel_groups(model, example_inputs, ignore=ignore)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _record(model, groups: ChannelGroups, val_fn, *, alpha, plan, removed) -> PathStep:
    miou, se = validation(val_fn, model)
    params = sum(p.numel() for p in model.parameters())
    return PathStep(float(alpha), int(groups.total_macs), int(params), miou, se, int(removed), plan)


def validation(val_fn: Callable, model: nn.Module) -> tuple[float, float | None]:
    """(mIoU, its standard error or None) from whatever `val_fn` returns (see `pruning_path`)."""
    result = val_fn(model)
    if not isinstance(result, dict):
        return float(result), None
    se = result.get("miou_se")
    per_image = result.get("per_image")
    if se is None and per_image is not None and len(per_image) > 1:
        se = float(np.nanstd(per_image, ddof=1) / math.sqrt(np.sum(~np.isnan(per_image))))
    return float(result["miou"]), None if se is None else float(se)


# --- one step --------------------------------------------------------------------------------------------
def _weakest_batch(model, groups, batches, criterion, loss_fn, budget, min_keep) -> tuple[dict, float]:
    """The channels to remove this step (weakest g first, floors respected) and the batch's alpha."""
    model.eval()
    delta_loss = delta_losses(model, groups, batches, criterion=criterion, loss_fn=loss_fn)
    cost = CostModel(model, groups)
    saved = {g.id: channel_macs(cost, g) for g in groups if g.id in delta_loss}
    g_score = {gid: delta_loss[gid] / np.where(saved[gid] > 0, saved[gid], np.nan) for gid in delta_loss}
    g_score = {gid: np.nan_to_num(s, nan=np.inf) for gid, s in g_score.items()}
    order = [(gid, c) for gid, c in removal_order(groups, g_score, min_keep=min_keep) if saved[gid][c] > 0]
    chosen, gained = [], 0.0
    for gid, c in order:  # the prefix of the order whose saving is nearest the budget (at least one channel)
        full = len(chosen) >= budget if isinstance(budget, int) else gained + saved[gid][c] - budget > budget - gained
        if chosen and full:
            break
        chosen.append((gid, c))
        gained += saved[gid][c]
    batch: dict[int, list[int]] = {}
    for gid, c in chosen:
        batch.setdefault(gid, []).append(c)
    dl = sum(float(delta_loss[gid][c]) for gid, c in chosen)
    return {gid: np.array(sorted(cs), dtype=np.int64) for gid, cs in batch.items()}, dl / max(gained, 1e-30)


def channel_macs(cost: CostModel, group: ChannelGroup) -> np.ndarray:
    """MACs saved by removing each channel of `group` on its own (exactly what `cost.macs` predicts)."""
    saved = np.zeros(group.size)
    for name in dict.fromkeys(group.modules()):
        macs = cost.module_macs.get(name, 0)
        share = {}
        for role in ("out", "in"):
            side = cost.sides[name].get(role)
            held = side is not None and side[0] == group.id
            share[role] = np.bincount(side[1], minlength=group.size) / len(side[1]) if held else 0.0
        saved += macs * (1 - (1 - share["out"]) * (1 - share["in"]))
    return saved


def delta_losses(model: nn.Module, groups: ChannelGroups, batches, *, criterion: str = "taylor",
                 loss_fn: Callable = default_loss) -> dict[int, np.ndarray]:
    """Per group, each channel's loss increase when removed: Taylor estimate or exact ablation (eval mode)."""
    if criterion == "taylor":
        taylor = Taylor(model, batches, lambda out, y: loss_fn(out, y))
        return {g.id: s for g in groups if not g.frozen and (s := taylor(g, model)) is not None}
    return ablation(model, groups, batches, loss_fn=loss_fn)


def ablation(model: nn.Module, groups: ChannelGroups, batches, *, loss_fn: Callable = default_loss
             ) -> dict[int, np.ndarray]:
    """Exact loss increase of every prunable channel masked alone (frozen channels score inf)."""
    base = mean_loss(model, batches, loss_fn)
    scores = {}
    for g in groups:
        if g.frozen:
            continue
        s = np.full(g.size, np.inf)
        for c in np.flatnonzero(g.prunable):
            with _masked(model, g, int(c)):
                s[c] = mean_loss(model, batches, loss_fn) - base
        scores[g.id] = s
    return scores


def mean_loss(model: nn.Module, batches, loss_fn: Callable) -> float:
    with torch.no_grad():
        total = 0.0
        for inputs, target in batches:
            args, kwargs = as_call(inputs)
            total += float(loss_fn(model(*args, **kwargs), target))
    return total / len(batches)


@contextlib.contextmanager
def _masked(model: nn.Module, group: ChannelGroup, channel: int):
    """Channel `channel` of `group` dead (as the oracle masks it) inside the block, restored after."""
    saved = []
    for m in group.members:
        module = model.get_submodule(m.module)
        dead = torch.from_numpy(m.index == channel)
        if m.role == "out" and dead.any():
            saved.append((module, {k: p.detach().clone() for k, p in module.named_parameters(recurse=False)}))
            _zero(module, m.role, dead)
    try:
        yield
    finally:
        with torch.no_grad():
            for module, params in saved:
                for k, value in params.items():
                    getattr(module, k).copy_(value)


def _lasso_reselect(model, groups, batch, batches, samples) -> tuple[dict, dict[str, Reconstruction]]:
    """Keep the batch's count per group; where a group feeds one plain conv, LASSO picks the channels."""
    out, recon = {}, {}
    by_id = {g.id: g for g in groups}
    for gid, chans in batch.items():
        consumer = consumer_of(by_id[gid], model)
        if consumer is None:
            out[gid] = chans
            continue
        out[gid], recon[consumer] = select_channels(model, by_id[gid], consumer, batches, drop=len(chans),
                                                    samples=samples, seed=gid)
    return out, recon


# --- choosing a sub-network ----------------------------------------------------------------------------------
def select(path: PruningPath, *, delta: float = 0.01, rule: str = "delta") -> int:
    """The index of the smallest (fewest MACs) sub-network whose validation mIoU is within `delta` of the best
    (rule "delta"; mIoU and delta as fractions, 0.01 = one point), or within one standard error of the best
    (rule "1se"; needs `miou_se` from `val_fn`)."""
    if rule not in ("delta", "1se"):
        raise ValueError(f"unknown selection rule {rule!r}; choose 'delta' or '1se'")
    if delta < 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    scored = [(i, s) for i, s in enumerate(path.steps) if not math.isnan(s.miou)]
    if not scored:
        raise ValueError("no step of the path has a validation mIoU")
    best_i, best = max(scored, key=lambda t: t[1].miou)
    if rule == "1se":
        if best.miou_se is None:
            raise ValueError("the 1-SE rule needs a standard error: let val_fn return 'miou_se' or 'per_image'")
        delta = best.miou_se
    return min((s.macs, i) for i, s in scored if s.miou >= best.miou - delta)[1]
