"""Channel groups: the sets of module slices that must lose the same channel together.

After the trace, every channel element belongs to a union-find class: one *channel* of the network,
which may span a conv's outputs, the BN after it, the other branch of a residual add, the next
layers' inputs, the matching slice of a concat, the decoder that reuses its pooling indices. A
*group* is a set of module dims ("members") that share channels, e.g. every layer joined by one
residual stream. A channel can be removed only when it is not frozen and some producer makes it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from segprune.prune.state import TraceState
from segprune.prune.trace import trace

# the layers that make channels (a weight row per output channel): what cost, masking and slimming look for
PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear)


class ChannelGroups(list):
    """The groups of a model (a list), with the MACs of each layer in one eval-mode pass, for cost targets."""

    def __init__(self, groups=(), *, module_macs: dict[str, int] | None = None, train_only: bool = True,
                 offsets: dict[str, str] | None = None, approximate: dict[int, str] | None = None,
                 eval_in_train: bool = False):
        super().__init__(groups)
        self.module_macs = dict(module_macs or {})
        self.train_only = train_only  # whether some layer runs only in train mode (an auxiliary head)
        self.offsets = dict(offsets or {})  # consumer -> op that may feed it f(0) != 0 (zeros.py, fold.py)
        self.approximate = dict(approximate or {})  # group id -> the allowed inexact op its channels pass
        self.eval_in_train = eval_in_train  # every (module, op) of the eval pass also runs in the train pass

    def like(self, groups) -> ChannelGroups:
        """Other groups of the same model (some frozen since), with this trace's MACs."""
        return ChannelGroups(groups, module_macs=self.module_macs, train_only=self.train_only, offsets=self.offsets,
                             approximate=self.approximate, eval_in_train=self.eval_in_train)

    @property
    def total_macs(self) -> int:
        """MACs of all convolutions and linear layers (what torch.utils.flop_counter counts, halved)."""
        return sum(self.module_macs.values())


@dataclass
class Member:
    """One module dim in a group: `index[p]` is the group channel held at position `p` of that dim."""

    module: str
    role: str  # "out" (output channels, norms' features) or "in" (input channels)
    index: np.ndarray


@dataclass
class ChannelGroup:
    """Channels that are removed together across `members`; `prunable[c]` is False for frozen ones."""

    id: int
    members: list[Member]
    prunable: np.ndarray
    reasons: dict[int, str] = field(default_factory=dict)  # frozen channel -> why

    @property
    def size(self) -> int:
        return len(self.prunable)

    @property
    def frozen(self) -> bool:
        return not self.prunable.any()

    @property
    def reason(self) -> str | None:
        """Why (some of) this group's channels are frozen, or None."""
        return next(iter(self.reasons.values()), None)

    def modules(self, role: str | None = None) -> list[str]:
        return [m.module for m in self.members if role is None or m.role == role]

    def __repr__(self) -> str:
        state = f"frozen: {self.reason}" if self.frozen else f"{int(self.prunable.sum())} prunable"
        names = ", ".join(f"{m.module}.{m.role}" for m in self.members[:4])
        more = f", +{len(self.members) - 4}" if len(self.members) > 4 else ""
        return f"ChannelGroup({self.id}, {self.size} channels, {state}; {names}{more})"


def channel_groups(model: nn.Module, example_inputs, *, ignore: Sequence[str] = (),
                   modes: Sequence[str] = ("eval", "train"), shape_only: bool = True,
                   allow_approximate: Sequence[str] = ()) -> ChannelGroups:
    """Trace `model` on `example_inputs` and return its channel groups.

    Args:
        model: any nn.Module; it is run, not modified.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        ignore: qualified module names whose output channels must not be removed (a name covers its children).
        modes: which modes to run; both by default so that train-only branches (auxiliary heads) count.
        shape_only: evaluate convolutions and linear layers for their shapes only (fast; zeros come out). Pass
            False for a model whose forward branches on values.
        allow_approximate: ops whose channels may be removed although that is not exact ("layer_norm",
            "rms_norm": the other channels' statistics change); `prune` reports the output change it measured.
    """
    _check_ignore(model, ignore)
    st = trace(model, example_inputs, modes=modes, shape_only=shape_only, allow_approximate=allow_approximate)
    for message in st.warnings:
        warnings.warn(f"segprune: {message}", stacklevel=2)
    return build_groups(st, ignore=ignore)


def _check_ignore(model: nn.Module, ignore: Sequence[str]) -> None:
    names = {name for name, _ in model.named_modules()}
    missing = [name for name in ignore if name not in names]
    if missing:
        raise ValueError(f"ignore names module(s) not in the model: {missing}")


def build_groups(st: TraceState, *, ignore: Sequence[str] = ()) -> ChannelGroups:
    """Turn the union-find classes of a trace into groups of members sharing channels."""
    roots = np.array([st.find(e) for e in range(len(st.parent))], dtype=np.int64)
    keys = list(st.bindings)
    classes = [roots[st.bindings[k]] for k in keys]
    frozen = _frozen_classes(st, roots, keys, classes, ignore)
    made = set(roots[list(st.created)].tolist()) if st.created else set()
    groups = []
    for members in _connected(classes):
        groups.append(_make_group(len(groups), [keys[k] for k in members], [classes[k] for k in members],
                                  frozen, made))
    train_only = "train" in st.bound_in.values()
    eval_in_train = st.calls.get("eval", set()) <= st.calls.get("train", set())
    approx = {int(roots[e]): op for e, op in st.approximate.items()}
    approximate = {g.id: op for g, cls in zip(groups, _group_classes(groups, keys, classes)) for c in cls
                   if (op := approx.get(c))}
    return ChannelGroups(groups, module_macs=st.macs, train_only=train_only, offsets=st.offsets,
                         approximate=approximate, eval_in_train=eval_in_train)


def _group_classes(groups, keys, classes):
    """The channel classes each group holds."""
    where = {key: cls for key, cls in zip(keys, classes)}
    return [set().union(*(where[(m.module, m.role)].tolist() for m in g.members)) for g in groups]


def _frozen_classes(st, roots, keys, classes, ignore) -> dict[int, str]:
    frozen = {}
    for e, reason in st.frozen.items():
        frozen.setdefault(int(roots[e]), reason)
    for (module, role), cls in zip(keys, classes):
        if role == "out" and any(module == n or module.startswith(n + ".") for n in ignore):
            for c in cls.tolist():
                frozen.setdefault(c, f"{module} is ignored")
    return frozen


def _connected(classes: list[np.ndarray]) -> list[list[int]]:
    """Bindings that share any class belong to one group (union-find over bindings)."""
    parent = list(range(len(classes)))

    def find(k):
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    seen: dict[int, int] = {}
    for k, cls in enumerate(classes):
        for c in np.unique(cls).tolist():
            if c in seen:
                parent[find(k)] = find(seen[c])
            else:
                seen[c] = k
    buckets: dict[int, list[int]] = {}
    for k in range(len(classes)):
        buckets.setdefault(find(k), []).append(k)
    return list(buckets.values())


def _make_group(gid, keys, classes, frozen, made) -> ChannelGroup:
    # channels numbered in the order the first producer ("out" member) holds them
    order = sorted(range(len(keys)), key=lambda k: keys[k][1] != "out")
    channel_of: dict[int, int] = {}
    for k in order:
        for c in classes[k].tolist():
            channel_of.setdefault(c, len(channel_of))
    members = [Member(module, role, np.array([channel_of[c] for c in cls.tolist()], dtype=np.int64))
               for (module, role), cls in zip(keys, classes)]
    prunable = np.zeros(len(channel_of), dtype=bool)
    reasons = {}
    for c, ch in channel_of.items():
        if c in frozen:
            reasons[ch] = frozen[c]
        elif c not in made:
            reasons[ch] = "no layer produces this channel"
        else:
            prunable[ch] = True
    return ChannelGroup(gid, members, prunable, reasons)
