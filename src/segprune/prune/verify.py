"""`prune` checks its own result: the pruned model must compute what the masked model computes.

No rule table is ever complete: an op that does not map 0 to 0, a shape saved before the cut, an attention
block written by hand. So after choosing a removal, `prune` runs the masked-equivalence oracle (see oracle.py)
on the example inputs, in float64 on copies: the physically pruned model against the original with the
removed channels zeroed. On a mismatch or a crash it bisects the cut groups to find the offending ones,
freezes them with a warning, chooses again and checks again, until the check passes. The user never receives
a model that was not checked.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.utils._pytree import tree_map

from segprune._utils import tensors
from segprune.prune.fold import Fold, apply_folds, consumers, folded_in_place, means, measure
from segprune.prune.graph import ChannelGroup, ChannelGroups
from segprune.prune.oracle import masked_in_place, relative_error
from segprune.prune.plan import Plan
from segprune.prune.trace import _Restore, as_call

Removal = dict[int, np.ndarray]
_FROZEN_IN_TRAIN = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd, nn.GroupNorm, nn.LayerNorm)


@dataclass
class Verification:
    """What `prune(verify=True)` checked and did.

    Attributes:
        checked: False when the check could not run (the original model fails on its example inputs).
        error: max |pruned - masked| / max |masked| over every output of the final model, in `dtype`.
        tolerance: the error above which a cut counts as wrong.
        dtype: the precision of the check ("float64" unless the model does not run in it).
        modes: the modes compared ("eval", and "train" with norms and dropout frozen when the model has
            train-only layers).
        frozen: one entry per group that failed: {"group", "modules", "channels", "why"}.
        checks: how many pruned models were built and compared (1 when the first cut was right).
        inputs: the shapes of the inputs checked (a crop of the example inputs unless verify="full").
        folded: consumers whose bias took the constant a removed channel still sent them (fold.py).
        compensated: consumers whose bias took the mean of the removed channels (prune(compensate=True)).
        approximate: the allowed inexact ops (allow_approximate) that made `error` exceed `tolerance`; `error` is
            then the measured output change of the pruned model against the masked one.
        seconds: the wall time verification took.
    """

    checked: bool = True
    error: float = 0.0
    tolerance: float = 1e-6
    dtype: str = "float64"
    modes: tuple[str, ...] = ("eval",)
    frozen: list[dict] = field(default_factory=list)
    checks: int = 0
    seconds: float = 0.0
    inputs: list[list[int]] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)
    approximate: list[str] = field(default_factory=list)
    compensated: list[str] = field(default_factory=list)


def verify_removal(model: nn.Module, example_inputs, groups: Sequence[ChannelGroup], removed: Removal,
                   select: Callable[[list[ChannelGroup]], Removal], *, tolerance: float = 1e-6,
                   modes: Sequence[str] = ("eval",), probe: int | None = 64, compensate: bool = False
                   ) -> tuple[list[ChannelGroup], Removal, Verification, nn.Module | None, list[Fold]]:
    """Check `removed` against the masked model; freeze failing groups and re-`select` until it passes.

    Returns the groups (copies, with failing ones frozen), the removal that passed, the record, the pruned model
    that passed in the model's own precision when that conversion is exact (else None: cut again), and the folds
    (constants into consumers' biases) the cut must apply before surgery.

    `probe`: check on a crop of the example inputs with this smallest side (None: on the inputs as given).
    `compensate`: fold what removed channels carry on average in the unpruned model into their consumers' biases
    (fold.means); the reference is then the masked model with the same biases.
    """
    start = time.perf_counter()
    offsets = getattr(groups, "offsets", {})
    checker = _Checker(model, example_inputs, tolerance, modes, probe, offsets, compensate)
    record = Verification(modes=tuple(modes))
    groups, removed, folds = _settle(checker, groups, removed, select, record, offsets)
    record.checked, record.tolerance = checker.ready, checker.tolerance
    record.dtype, record.checks = str(checker.dtype).removeprefix("torch."), checker.checks
    record.inputs = checker.shapes
    record.seconds = time.perf_counter() - start
    record.folded = sorted({f.consumer for f in folds})
    record.compensated = sorted({f.consumer for f in checker.comp})
    last, pruned = checker.last
    reuse = checker.ready and removed and last is removed
    return groups, removed, record, _back(pruned, model) if reuse else None, folds + checker.comp


def _back(pruned, model):
    """The checked copy in the original precision: exact when every floating tensor had one dtype (float64 holds
    any float32/float16/bfloat16 value); its modes are the original's (the check ran it in eval and train)."""
    floating = {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}
    if pruned is None or len(floating) != 1:
        return None
    pruned.to(floating.pop())
    for a, b in zip(model.modules(), pruned.modules()):  # same structure: surgery replaces tensors, not modules
        b.training = a.training
    return pruned


def _settle(checker, groups, removed, select, record, offsets):
    """Measure folds, check, bisect, freeze, re-select, until the removal passes (each round freezes a group)."""
    while True:
        ok, error, why, folds, bad = checker.check(groups, removed, offsets=offsets)
        allowed = {gid: op for gid, op in getattr(groups, "approximate", {}).items() if gid in removed}
        if not bad and not ok:
            bad = _blame(checker, groups, removed, folds, allowed, (ok, error, why))
        if not bad:
            record.error = error
            record.approximate = sorted({op for op in allowed.values()}) if error > checker.tolerance else []
            return groups, removed, folds
        groups = _like(groups, [_frozen(g, bad[g.id]) if g.id in bad else g for g in groups])
        for gid, why in bad.items():
            entry = _entry(groups[_index(groups, gid)], removed[gid], why)
            record.frozen.append(entry)
            warnings.warn(_message(entry), stacklevel=4)
        removed = select(groups)


def _blame(checker, groups, removed, folds, allowed, known) -> dict[int, str]:
    """The groups to freeze after a failed check. Groups whose inexact removal the user allowed
    (allow_approximate) are blamed only for a crash: when the rest alone is exact, nothing is."""

    def check(ids):
        ok, error, why = checker.check(groups, {g: removed[g] for g in ids}, folds=folds)[:3]
        lenient = not ok and error != float("inf") and all(g in allowed for g in ids)
        return ok or lenient, error, why

    exact = [g for g in sorted(removed) if g not in allowed]
    if allowed and known[1] != float("inf"):
        return _find_bad(check, exact) if exact else {}
    return _find_bad(check, sorted(removed), known, allowed)


def _find_bad(check, ids: list[int], known=None, allowed=()) -> dict[int, str]:
    """The groups whose cut alone fails (bisection); all of `ids` when only their combination fails (unless some
    are allowed to be inexact: their combination is then what differs)."""
    ok, error, why = known or check(ids)
    if ok:
        return {}
    if len(ids) == 1:
        return {ids[0]: why}
    half = len(ids) // 2
    bad = _find_bad(check, ids[:half], None, allowed) | _find_bad(check, ids[half:], None, allowed)
    if bad or (any(g in allowed for g in ids) and error != float("inf")):
        return bad
    return {gid: f"{why} (only when cut together with groups {ids})" for gid in ids}


class _Checker:
    """Compares the pruned model with the masked one on the example inputs (or a crop of them, see `probe`).

    One float64 copy of the model is kept; it is masked in place for the reference and restored, and the pruned
    copy is cut from the original (in its own precision, the cheaper copy) and then converted.
    """

    def __init__(self, model, example_inputs, tolerance, modes, probe, offsets, compensate=False):
        self.offsets, self.compensate, self.comp = offsets, compensate, []
        self.model, self.modes, self.checks, self.tolerance, self.ready = model, tuple(modes), 0, tolerance, True
        self.last = (None, None)  # (removal, pruned copy) of the last check that built a model
        self.example_inputs = example_inputs
        crop = cropped(example_inputs, probe) if probe else example_inputs
        self.probes = [example_inputs] if crop is example_inputs else [crop, example_inputs]
        self._use(torch.float64)

    def _use(self, dtype):
        self.dtype = dtype
        self.base = converted_copy(self.model, dtype, lambda m: m)
        self.inputs = _cast(self.probes[0], dtype)

    def reference(self, groups, removed, wanted=(), full=False):
        """(the masked model's outputs, folds, unfoldable groups); float64 unless the model cannot run in it, on the
        crop unless the model cannot run on it; None if the model cannot run at all."""
        try:
            if self.compensate and full:  # measured on the unpruned model, once per removal
                self.comp = means(self.base, self._run_on, consumers(groups, removed, None))
            with folded_in_place(self.base, self.comp, removed), masked_in_place(self.base, groups, removed):
                folds, bad = measure(self.base, self._run_on, wanted, self.offsets) if wanted else ([], {})
                return self.run(self.base), folds, bad
        except Exception as err:  # noqa: BLE001 - any failure of user code means: try the next setting
            if len(self.probes) > 1:
                self.probes.pop(0)
            elif self.dtype != _model_dtype(self.model):
                self.tolerance = max(self.tolerance, 1e-4)
                self.dtype = _model_dtype(self.model)
            else:
                warnings.warn(f"segprune: verify: the model does not run on its example inputs ({type(err).__name__}"
                              f": {err}); the pruned model is NOT checked", stacklevel=5)
                self.ready = False
                return None
            self._use(self.dtype)
            return self.reference(groups, removed, wanted, full)

    def _run_on(self, model, which):
        """Input 0: the inputs checked; input 1: the same, scaled and shifted (constants must not depend on it)."""
        inputs = self.inputs
        if which:
            inputs = tree_map(lambda t: t * 0.5 + 0.25 if isinstance(t, torch.Tensor) and t.is_floating_point()
                              else t, inputs)
        return self.run(model, inputs)

    def run(self, model: nn.Module, inputs=None) -> list[torch.Tensor]:
        """Outputs in every mode, with the same random state each time (a model may draw noise in forward)."""
        args, kwargs = as_call(self.inputs if inputs is None else inputs)
        outs = []
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for mode in self.modes:
                _set_mode(model, mode)
                torch.manual_seed(0)
                outs += [t.detach() for t in tensors(model(*args, **kwargs))]
        return outs

    def check(self, groups, removed, *, folds=None, offsets=None):
        """(passed, relative error, why it failed, folds, {group: why its constants cannot be folded}). With
        `offsets`, the constants removed channels feed their consumers are measured on the reference first."""
        if not removed:
            return True, 0.0, "", [], {}
        self.checks += 1
        wanted = consumers(groups, removed, offsets or {})
        reference = self.reference(groups, removed, wanted, full=folds is None)
        if reference is None:
            return True, float("nan"), "not checked", [], {gid: "verify could not run the model" for gid, *_ in wanted}
        reference, measured, bad = reference
        folds = measured if folds is None else folds
        if bad:
            return False, float("inf"), "", folds, bad
        where = _Where()
        try:
            plan, added = Plan.from_removal(self.model, groups, removed), folds + self.comp
            cut = lambda m: plan.apply(apply_folds(m, added, removed))  # noqa: E731
            pruned = converted_copy(self.model, self.dtype, cut)
            where.names = _names(pruned)
            with where, _Restore(pruned):
                out = self.run(pruned)
        except Exception as err:  # noqa: BLE001 - a crash of the pruned model is exactly what we look for
            return False, float("inf"), f"the pruned model fails{where.at()}: {type(err).__name__}: {err}", folds, {}
        error = relative_error(reference, out)
        ok = error <= self.tolerance
        self.last = (removed, pruned)
        why = "" if ok else f"the pruned model differs from the masked model by {error:.2e} (relative)"
        return ok, error, why, folds, {}

    @property
    def shapes(self) -> list[list[int]]:
        return [list(t.shape) for t in tensors(self.inputs)]


def cropped(example_inputs, side: int):
    """The top-left `side` x `side` crop (at least; halving keeps the sizes' divisibility) of every input with
    spatial dims, or the inputs themselves when they are that small already. A channel cut that is wrong is wrong
    at any size, so checking a crop costs a fraction of the time; a model that cannot run on it (a fixed input
    size) is checked on the full inputs instead."""
    images = [t for t in tensors(example_inputs) if t.dim() >= 4 and t.is_floating_point()]
    if not images:
        return example_inputs
    hw = tuple(images[0].shape[-2:])
    factor = 1
    while min(hw) // (factor * 2) >= side and all(s % (factor * 2) == 0 for s in hw):
        factor *= 2
    if factor == 1:
        return example_inputs
    crop = lambda t: t[..., : t.shape[-2] // factor, : t.shape[-1] // factor] if tuple(t.shape[-2:]) == hw else t  # noqa: E731
    return tree_map(lambda t: crop(t) if isinstance(t, torch.Tensor) and t.dim() >= 3 else t, example_inputs)


def converted_copy(model: nn.Module, dtype: torch.dtype, change: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """`change` (surgery, which replaces the tensors it cuts) applied to a copy of `model`, converted to `dtype`.

    Copying a large model is a good part of the check's time, so the copy shares the original's floating tensors
    until surgery or the conversion replaces them; those still shared after both (already `dtype`, and not cut)
    are copied then.
    """
    tensors_ = [*model.parameters(), *model.buffers()]
    out = change(copy.deepcopy(model, {id(t): _shared(t) for t in tensors_})).to(dtype)
    originals = {t.data_ptr() for t in tensors_ if t.is_floating_point() and t.numel()}
    for t in [*out.parameters(), *out.buffers()]:
        if t.data_ptr() in originals:
            t.data = t.data.clone()
    return out


def _shared(t):
    if not t.is_floating_point():
        return t.clone()  # counters are never converted: they must not stay shared
    return nn.Parameter(t.detach(), t.requires_grad) if isinstance(t, nn.Parameter) else t.detach()


def _set_mode(model, mode):
    """"train" runs train-only branches (auxiliary heads) with norms and dropout as in eval: deterministic."""
    model.train(mode == "train")
    for m in model.modules():
        if isinstance(m, _FROZEN_IN_TRAIN):
            m.eval()


def _model_dtype(model):
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _cast(example_inputs, dtype):
    return tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                    example_inputs)


def _names(model):
    names = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)
    return names


class _Where:
    """Which module was running when the pruned model raised: the innermost one entered and not left."""

    def __init__(self):
        self.names, self.stack = {}, []

    def at(self) -> str:
        if not self.stack:
            return ""
        return f" in {self.stack[-1]}" if self.stack[-1] else " in the model's top-level forward"

    def __enter__(self):
        self.handles = [module_hooks.register_module_forward_pre_hook(self._pre),
                        module_hooks.register_module_forward_hook(self._post)]

    def _pre(self, module, args):
        self.stack.append(self.names.get(id(module), ""))

    def _post(self, module, args, out):
        if self.stack:
            self.stack.pop()

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _frozen(group: ChannelGroup, why: str) -> ChannelGroup:
    reasons = {**group.reasons, **{int(c): f"verify: {why}" for c in np.flatnonzero(group.prunable)}}
    return dataclasses.replace(group, prunable=np.zeros_like(group.prunable), reasons=reasons)


def _like(groups, new):
    """Keep the ChannelGroups' trace facts (MACs, offsets) on the new list."""
    return groups.like(new) if isinstance(groups, ChannelGroups) else new


def _index(groups, gid):
    return next(i for i, g in enumerate(groups) if g.id == gid)


def _entry(group: ChannelGroup, cut: np.ndarray, why: str) -> dict:
    return {"group": group.id, "modules": sorted(set(group.modules())), "channels": int(len(cut)), "why": why}


def _message(entry: dict) -> str:
    modules = ", ".join(entry["modules"][:6]) + (", ..." if len(entry["modules"]) > 6 else "")
    return (f"segprune: verify: cutting {entry['channels']} channel(s) of group {entry['group']} ({modules}) is not "
            f"exact: {entry['why']}. Those channels are frozen and the model was cut again. Usually an op between "
            "these layers does not map 0 to 0, or a shape is saved before the cut and reused; pass "
            "ignore=[...] to keep these layers on purpose, or register a rule for the op.")


def unfolded(groups, removed: Removal, select) -> tuple[list[ChannelGroup], Removal]:
    """Without verification the constants cannot be measured: freeze, with a warning, every group whose removed
    channels reach a consumer through an op that does not map 0 to 0."""
    offsets = getattr(groups, "offsets", {})
    while bad := {gid: f"{offsets[name]} may feed {name} nonzero values on removed channels, and verify=False "
                       "does not measure them to fold them" for gid, name, _ in consumers(groups, removed, offsets)}:
        groups = _like(groups, [_frozen(g, bad[g.id]) if g.id in bad else g for g in groups])
        for gid, why in bad.items():
            warnings.warn(_message(_entry(groups[_index(groups, gid)], removed[gid], why)), stacklevel=3)
        removed = select(groups)
    return groups, removed
