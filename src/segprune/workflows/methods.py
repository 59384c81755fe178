"""The one registry of compression methods: what a recipe's ``method`` means, for runs, the CLI and benchmarks.

A method is three choices (the vocabulary of STYLE.md): the *sparsity* trained with before pruning (a regulariser
on the BN scales, or none), the *criterion* that scores channels, and the *strategy* that decides what to cut
(``threshold``: one global threshold to a ratio or a MAC target, in passes or Miao et al.'s schedules; ``path``:
Liu et al.'s post-pruning path and selection). Everything else reads this table; nothing works the mapping out
again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from segprune._utils import logits
from segprune.prune import BNSparsity, CAPSparsity, Taylor


@dataclass(frozen=True)
class Method:
    """A compression method: sparsity regulariser, channel criterion, selection strategy."""

    name: str
    sparsity: str | None  # "slimming" (L1 on BN scales), "cap" (context-aware guided L1) or None
    criterion: str  # a name of segprune.prune.criteria.CRITERIA, or "taylor" (scored on training batches)
    strategy: str  # "threshold" or "path"
    summary: str

    @property
    def needs_data(self) -> bool:
        """Whether choosing channels needs training batches (it cannot run on a checkpoint alone)."""
        return self.criterion == "taylor" or self.strategy == "path"


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("slimming", "slimming", "bn_scale", "threshold", "network slimming: L1 on BN scales, one |γ| threshold"),
    Method("cap", "cap", "bn_scale", "threshold", "CAP: context-aware guided sparsity on BN scales, |γ| threshold"),
    Method("bn_scale", None, "bn_scale", "threshold", "|γ| threshold without sparsity training"),
    Method("l1", None, "l1", "threshold", "filter L1 norm"),
    Method("l2", None, "l2", "threshold", "filter L2 norm"),
    Method("fpgm", None, "fpgm", "threshold", "distance from the geometric median (FPGM)"),
    Method("taylor", None, "taylor", "threshold", "first-order Taylor importance on 8 training batches"),
    Method("random", None, "random", "threshold", "random channels (the control)"),
    Method("postprune", None, "taylor", "path", "post-pruning: weakest-link path, then selection on validation"),
)}


def method(name: str) -> Method:
    """The registered method called ``name``; an unknown name is a clear error listing the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def checkpoint_methods() -> list[str]:
    """Methods that prune a checkpoint with no data (``segprune prune``): the threshold methods on weights."""
    return [m.name for m in METHODS.values() if not m.needs_data]


def regularizer(name: str, model: nn.Module, groups, *, lam: float, warmup: int = 0, cap_affinity: str = "dot",
                cap_weight: str = "one_minus", cap_temperature: float = 0.1):
    """The sparsity regulariser method ``name`` trains with (on the prunable groups' BN scales), or None."""
    kind = method(name).sparsity
    if kind == "slimming":
        return BNSparsity(model, lam=lam, groups=groups, warmup=warmup)
    if kind == "cap":
        return CAPSparsity(model, lam=lam, groups=groups, warmup=warmup, affinity=cap_affinity, weight=cap_weight,
                           temperature=cap_temperature)
    return None


def criterion(name: str, model: nn.Module, batches=(), pixel_loss: Callable | None = None):
    """The channel criterion of method ``name``: a CRITERIA name, or a :class:`Taylor` scored on ``batches``."""
    crit = method(name).criterion
    if crit != "taylor":
        return crit
    batches = list(batches)
    if not batches or pixel_loss is None:
        raise ValueError(f"method {name} scores channels on training batches: it needs data (run a recipe)")
    return Taylor(model, batches, lambda out, y: pixel_loss(logits(out), y))
