"""Methods decide what to cut from the criteria's scores; they never look at weights themselves.

`ratio` is always the fraction of prunable channels removed. A per-layer floor keeps at least
`max(1, ceil(min_keep * width))` channels of every member of a group (a group joined by a concat
holds several layers, and none of them may lose all its channels).
"""

from __future__ import annotations

import math

import numpy as np

from segprune.prune.graph import ChannelGroup


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


def select_global(groups: list[ChannelGroup], scores: dict[int, np.ndarray], *, ratio: float,
                  min_keep: float = 0.1) -> dict[int, np.ndarray]:
    """One global threshold over all scored channels (network slimming), respecting every layer's floor."""
    pool = sorted((float(scores[g.id][c]), g.id, int(c)) for g in groups if g.id in scores
                  for c in np.flatnonzero(g.prunable))
    target = int(round(ratio * len(pool)))
    floors = {g.id: _Floor(g, min_keep) for g in groups if g.id in scores}
    removed: dict[int, list[int]] = {}
    for _, gid, c in pool:
        if target == 0:
            break
        if floors[gid].take(c):
            removed.setdefault(gid, []).append(c)
            target -= 1
    return {gid: np.array(sorted(cs), dtype=np.int64) for gid, cs in removed.items()}


def select_uniform(groups: list[ChannelGroup], scores: dict[int, np.ndarray], *, ratio: float,
                   min_keep: float = 0.1) -> dict[int, np.ndarray]:
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
    return removed


METHODS = {"global": select_global, "uniform": select_uniform}
