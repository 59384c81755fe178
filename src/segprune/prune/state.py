"""The bookkeeping of a trace: channel elements, their union-find, and what each tensor carries.

Every channel of every traced tensor is an *element* id. An op's rule says which elements of its
inputs and outputs are the same channel (union), which are new (a conv's output), and which can
never be removed (frozen). Modules are bound to the elements along their prunable dims ("out" and
"in" roles), so that surgery knows which weight slices belong to which channel.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

_EXPECTED = {"a model input", "reaches the model's output"}  # freezes nobody needs to hear about


@dataclass
class TensorInfo:
    """The channel elements a traced tensor carries along its channel dim `cdim`."""

    ids: np.ndarray
    cdim: int
    nonzero: str | None = None  # the op that makes a removed (zero) channel nonzero here, e.g. "sigmoid (in a.b)"


class TraceState:
    """Union-find over channel elements plus the facts rules record about them."""

    def __init__(self):
        self.parent: list[int] = []
        self.frozen: dict[int, str] = {}  # element -> first reason it was frozen
        self.created: set[int] = set()  # elements made by a producer (conv/linear output)
        self.free: set[int] = set()  # elements tied to nothing (set_free): no producer can remove them
        self.info: dict[int, TensorInfo] = {}  # id(tensor) -> what it carries, while the tensor lives
        self.bindings: dict[tuple[str, str], np.ndarray] = {}  # (module name, role) -> elements
        self.bound_in: dict[tuple[str, str], str] = {}  # (module name, role) -> the mode that first bound it
        self.producers: dict[str, np.ndarray] = {}  # module name -> its output elements (shared modules)
        self.warnings: list[str] = []
        self.allow_approximate: tuple[str, ...] = ()  # ops whose inexact removal the user accepts (layer_norm)
        self.approximate: dict[int, str] = {}  # element -> the inexact op it passes (allowed, measured by verify)
        self.offsets: dict[str, str] = {}  # consumer module -> the op that may feed it f(0) != 0 on removed channels
        self.module_path = ""  # innermost module running now, for messages
        self.current_op = ""  # the op whose rule runs now
        self.shape_only = True  # conv/linear compute shapes only (see trace.py)
        self.mode = "eval"  # the pass running now
        self.macs: dict[str, int] = {}  # module -> multiply-accumulates of its calls in the eval pass
        self.owners: dict[int, tuple[str, torch.nn.Module]] = {}  # id(parameter or buffer) -> owner
        self.calls: dict[str, set[tuple[str, str]]] = {}  # mode -> (module, op) pairs that ran in it
        self.modules: dict[str, torch.nn.Module] = {}  # qualified name -> module (split sizes held in attributes)
        self.params_by_ptr: dict[int, list[tuple[str, torch.nn.Module]]] = {}  # data_ptr -> (name, owning module)

    # elements -----------------------------------------------------------------------------------
    def fresh(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, e: int) -> int:
        parent = self.parent
        root = e
        while parent[root] != root:
            root = parent[root]
        while parent[e] != root:  # path compression
            parent[e], e = root, parent[e]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Make element a[i] and b[i] the same channel, for every i."""
        parent = self.parent
        for x, y in zip(a.tolist(), b.tolist()):  # find, inlined with path halving: the trace's hottest loop
            while parent[x] != x:
                parent[x] = x = parent[parent[x]]
            while parent[y] != y:
                parent[y] = y = parent[parent[y]]
            if x != y:
                parent[y] = x

    def union_all(self, ids: np.ndarray) -> None:
        """Make every element of `ids` one channel (a GroupNorm group, a conv group)."""
        if len(ids) > 1:
            self.union(np.full(len(ids) - 1, ids[0]), ids[1:])

    def freeze(self, ids: np.ndarray, reason: str) -> None:
        """Never prune these elements; say so unless they are the model's inputs or outputs (a frozen channel costs
        compression, and the user should know why)."""
        fresh = [e for e in ids.tolist() if e not in self.frozen]
        for e in fresh:
            self.frozen[e] = reason
        if fresh and reason not in _EXPECTED:
            self.warn(f"{reason}: {len(fresh)} channel(s) frozen (never pruned). If they should be prunable, rewrite "
                      "that code with whole-tensor ops or register a rule for the op (segprune.prune.rules.RULES)")

    @property
    def where(self) -> str:
        """The module running now, for messages."""
        return self.module_path or "the model's top-level forward"

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    # tensors ------------------------------------------------------------------------------------
    def get(self, t) -> TensorInfo | None:
        if isinstance(t, torch.Tensor):
            return self.info.get(id(t))
        return None

    def set(self, t: torch.Tensor, ids: np.ndarray, cdim: int) -> None:
        # Python reuses the id of a freed tensor: forget a tensor's entry the moment it dies, so an id-keyed
        # table never joins unrelated tensors (and memory stays that of a plain forward pass).
        if id(t) not in self.info:
            weakref.finalize(t, self.info.pop, id(t), None)
        self.info[id(t)] = TensorInfo(ids, cdim)

    def set_opaque(self, t, reason: str, cdim: int = 1) -> None:
        """Give an output whose channels relate to nothing known fresh, frozen elements along `cdim` (the layout
        of the op's input, so that a channels-last tensor stays channels-last)."""
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            cdim = cdim if cdim < t.dim() else 1
            ids = self.fresh(t.shape[cdim])
            self.freeze(ids, reason)
            self.set(t, ids, cdim)

    def set_free(self, t: torch.Tensor, cdim: int) -> None:
        """Channels tied to nothing (a size-1 channel broadcast onto C): they couple nothing."""
        ids = self.fresh(t.shape[cdim])
        self.free.update(ids.tolist())
        self.set(t, ids, cdim)

    def is_free(self, info: TensorInfo) -> bool:
        """Whether a tensor carries only channels tied to nothing (attention scores after q kᵀ)."""
        return all(e in self.free for e in info.ids.tolist())

    def count_macs(self, module: str, macs: int) -> None:
        if self.mode == "eval":  # the deployed cost; the train pass would count aux heads and shared calls twice
            self.macs[module] = self.macs.get(module, 0) + int(macs)

    # modules ------------------------------------------------------------------------------------
    def bind(self, module: str, role: str, ids: np.ndarray) -> None:
        """Record that `module`'s `role` dim holds these elements; repeated calls must agree."""
        key = (module, role)
        if key in self.bindings:
            old = self.bindings[key]
            if len(old) != len(ids):
                self.freeze(np.concatenate([old, ids]), f"{module} is called with different widths")
                return
            self.union(old, ids)
        else:
            self.bindings[key] = ids
            self.bound_in[key] = self.mode
