"""Selection decides what to cut from the criteria's scores; it never looks at weights itself.

`ratio` is always the fraction of prunable channels removed. A per-layer floor keeps at least
`max(1, ceil(min_keep * width))` channels of every member of a group (a group joined by a concat holds
several layers, and none of them may lose all its channels). `round_to=N` keeps every group's channel
count a multiple of N (rounded up: fewer removals, never more) so that kernels stay fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from segprune.prune.graph import ChannelGroup

Removal = dict[int, np.ndarray]


class _Floor:
    """Tracks, for one group, how many positions each member keeps, and refuses a cut below its floor."""

    def __init__(self, group: ChannelGroup, min_keep: float):
        self.left = np.array([len(m.index) for m in group.members])
        self.floor = np.array([max(1, math.ceil(min_keep * n)) for n in self.left])
        # held[c] = positions channel c occupies in each member
        self.held = np.stack([np.bincount(m.index, minlength=group.size) for m in group.members], axis=1)

    def take(self, channel: int) -> bool:
        after = self.left - self.held[channel]
        if (after < self.floor).any():
            return False
        self.left = after
        return True


def removal_order(groups: list[ChannelGroup], scores: dict[int, np.ndarray], *,
                  min_keep: float = 0.1) -> list[tuple[int, int]]:
    """Every channel one global threshold can remove, weakest first, skipping those a floor protects: the
    removal at threshold t is a prefix of this list."""
    pool = sorted((float(scores[g.id][c]), g.id, int(c)) for g in groups if g.id in scores
                  for c in np.flatnonzero(g.prunable))
    floors = {g.id: _Floor(g, min_keep) for g in groups if g.id in scores}
    return [(gid, c) for _, gid, c in pool if floors[gid].take(c)]


def _prefix(order: list[tuple[int, int]], n: int) -> Removal:
    removed: dict[int, list[int]] = {}
    for gid, c in order[:n]:
        removed.setdefault(gid, []).append(c)
    return {gid: np.array(sorted(cs), dtype=np.int64) for gid, cs in removed.items()}


def round_removal(groups: list[ChannelGroup], removed: Removal, round_to: int | None) -> Removal:
    """Give back the last-chosen channels of each group until its kept count is a multiple of `round_to`."""
    if not round_to or round_to <= 1:
        return removed
    sizes = {g.id: g.size for g in groups}
    out = {}
    for gid, chans in removed.items():
        kept = sizes[gid] - len(chans)
        n = len(chans) - (-kept % round_to)  # kept rounded up to a multiple
        if n > 0:
            out[gid] = chans[:n] if n < len(chans) else chans
    return out


def select_global(groups, scores, *, ratio: float, min_keep: float = 0.1, round_to: int | None = None) -> Removal:
    """One global threshold removing `ratio` of all scored prunable channels (network slimming)."""
    total = sum(int(g.prunable.sum()) for g in groups if g.id in scores)
    order = removal_order(groups, scores, min_keep=min_keep)
    return round_removal(groups, _prefix(order, int(round(ratio * total))), round_to)


def select_uniform(groups, scores, *, ratio: float, min_keep: float = 0.1, round_to: int | None = None) -> Removal:
    """The same fraction of every group's prunable channels, weakest first."""
    removed = {}
    for g in groups:
        if g.id not in scores:
            continue
        channels = np.flatnonzero(g.prunable)
        target, floor = int(round(ratio * len(channels))), _Floor(g, min_keep)
        ranked = channels[np.argsort(scores[g.id][channels], kind="stable")]
        taken = [int(c) for c in ranked if floor.take(int(c))][:target]
        if taken:
            removed[g.id] = np.array(sorted(taken), dtype=np.int64)
    return round_removal(groups, removed, round_to)


def select_target(groups, scores, *, cost: Callable[[Removal], float], target: float, min_keep: float = 0.1,
                  round_to: int | None = None) -> Removal:
    """The fewest removals, along one global threshold, that bring `cost(removal)` (a fraction of the
    original) to `target` or below; found by bisection on the threshold. Raises if the floors forbid it."""
    order = removal_order(groups, scores, min_keep=min_keep)
    at = lambda n: round_removal(groups, _prefix(order, n), round_to)  # noqa: E731
    if cost(at(len(order))) > target:
        raise ValueError(f"target {target:.3f} is out of reach: removing every channel the per-layer floors allow "
                         f"(min_keep={min_keep}) leaves {cost(at(len(order))):.3f} of the original; layers at their "
                         f"floor: {', '.join(_at_floor(groups, scores, order)[:6])}")
    lo, hi = 0, len(order)  # cost(at(hi)) <= target; find the smallest such n
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if cost(at(mid)) <= target else (mid + 1, hi)
    return at(hi)


def _at_floor(groups, scores, order) -> list[str]:
    """Producers of the groups whose floor stopped the removal."""
    taken: dict[int, int] = {}
    for gid, _ in order:
        taken[gid] = taken.get(gid, 0) + 1
    return [g.modules("out")[0] for g in groups if g.id in scores and taken.get(g.id, 0) < g.prunable.sum()]


SELECTIONS = {"global": select_global, "uniform": select_uniform}
