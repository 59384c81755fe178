"""Latency lookup tables and the allocation of channel removals to a measured latency budget (HALP, NeurIPS 2022).

Why: MACs do not predict speed. A runtime pads channel counts to its kernels' block size (on an AVX-512 CPU, oneDNN
runs 57 output channels as slowly as 64), some layers are memory-bound, and the ops between convolutions cost what
their tensors weigh. A :class:`LatencyTable` holds, for every layer *shape* (kind, kernel, stride, dilation, input
and output size), its measured latency on a grid of kept (input, output) widths, the width steps below which the
runtime gains nothing, and the model's layers mapped onto those shapes; the rest of the model (activations, adds,
upsampling, pooling) is a term fitted to whole-model measurements, linear in the fraction of activation channels
kept. Measuring a table runs layers on a runtime and lives in ``segprune.eval.latency``; this module only predicts
and allocates, so the engine stays free of runtimes.

A table is tied to what it was measured on: runtime, threads, dtype, input shape and model. ``check`` refuses a
table whose conditions differ and says what differs.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from segprune.prune.graph import ChannelGroup
from segprune.prune.select import _Floor

SCHEMA = 1
CONDITIONS = ("runtime", "precision", "threads", "dtype", "input", "cpu")  # other conditions: refused
_UNRECORDED = {"precision": "fp32"}  # what a table written before a condition was recorded was measured at
LAYER_TYPES = (nn.Conv2d, nn.Linear)
Removal = dict[int, np.ndarray]


@dataclass
class Entry:
    """Latency (ms) of one layer shape on a grid of kept widths: ``ms[i][j]`` at ``ins[i]`` inputs, ``outs[j]``
    outputs. ``step_in``/``step_out``: the runtime's width granularity (a width is padded up to a multiple)."""

    ins: list[int]
    outs: list[int]
    ms: list[list[float]]
    step_in: int = 1
    step_out: int = 1

    def predict(self, cin: float, cout: float) -> float:
        """Bilinear interpolation at the widths padded up to the steps; linear towards zero below the grid."""
        cin, cout = _pad(cin, self.step_in), _pad(cout, self.step_out)
        return float(_interp2(np.asarray(self.ins, float), np.asarray(self.outs, float), np.asarray(self.ms), cin,
                              cout))


@dataclass
class Layer:
    """One layer of the model the table was made for: its shape key and full widths (depthwise: in == out)."""

    key: str
    cin: int
    cout: int
    volume: int  # output elements per channel (H*W): what the ops after the layer touch per kept channel
    depthwise: bool = False


@dataclass
class LatencyTable:
    """Per-layer latency as a function of kept widths, for one model on one runtime; see the module docstring.

    ``meta`` records runtime, threads, dtype, input shape, model name and fingerprint, torch / onnxruntime versions,
    CPU model and date; ``rest_ms`` + ``rest_ms_per_element`` × (kept output channels × H × W, summed over layers)
    model everything that is not a table layer; ``scale`` multiplies the layers' times (a layer timed alone does
    not run at its speed inside the model: caches, load); both are fitted to whole-model timings.
    ``measured_ms`` is the whole model's measured latency, unpruned.
    """

    meta: dict
    entries: dict[str, Entry] = field(default_factory=dict)
    layers: dict[str, Layer] = field(default_factory=dict)
    rest_ms: float = 0.0
    rest_ms_per_element: float = 0.0
    measured_ms: float | None = None
    scale: float = 1.0

    # --- prediction --------------------------------------------------------------------------------------------
    def full_widths(self) -> dict[str, tuple[int, int]]:
        return {name: (layer.cin, layer.cout) for name, layer in self.layers.items()}

    def layer_ms(self, name: str, cin: float, cout: float) -> float:
        layer = self.layers[name]
        return self.scale * self.entries[layer.key].predict(cout if layer.depthwise else cin, cout)

    def volume_ms(self, name: str, cout: float) -> float:
        """The share of the rest term that follows this layer's kept outputs (activations, adds, upsampling)."""
        return self.rest_ms_per_element * cout * self.layers[name].volume

    def predict(self, widths: dict[str, tuple[float, float]] | None = None) -> float:
        """Whole-model latency (ms) with these kept (in, out) widths per layer; missing layers are at full width."""
        widths = {**self.full_widths(), **(widths or {})}
        layers = sum(self.layer_ms(name, *widths[name]) for name in self.layers)
        volume = sum(self.volume_ms(name, widths[name][1]) for name in self.layers)
        return self.rest_ms + layers + volume

    def predict_model(self, model: nn.Module) -> float:
        """Predicted latency of `model` (e.g. a pruning of the model the table was made for) from its layer widths."""
        return self.predict(layer_widths(model, self.layers))

    def ratio(self, widths: dict[str, tuple[float, float]]) -> float:
        return self.predict(widths) / self.predict()

    def ratio_of(self, model: nn.Module) -> float:
        """Predicted latency of `model` as a fraction of the unpruned model's."""
        return self.predict_model(model) / self.predict()

    def step(self, name: str, role: str) -> int:
        entry = self.entries[self.layers[name].key]
        return entry.step_out if role == "out" or self.layers[name].depthwise else entry.step_in

    # --- conditions --------------------------------------------------------------------------------------------
    def check(self, **expected) -> None:
        """Refuse the table if any given condition (runtime, precision, threads, dtype, input, cpu) differs from
        what it was measured under; the error names every difference."""
        unknown = set(expected) - set(CONDITIONS)
        if unknown:
            raise ValueError(f"unknown table condition(s) {sorted(unknown)}; choose from {CONDITIONS}")
        recorded = {k: self.meta.get(k, _UNRECORDED.get(k)) for k in expected}
        diffs = [f"{k}: table {recorded[k]!r}, wanted {_plain(v)!r}" for k, v in expected.items()
                 if v is not None and _plain(v) != recorded[k]]
        if diffs:
            raise ValueError(f"latency table {self.meta.get('model')!r} measured under other conditions: "
                             + "; ".join(diffs))

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model whose layers are not the ones the table was measured for (names, kinds, widths)."""
        skipped = set(self.meta.get("not_run", []))  # train-only layers (aux heads) are not deployed
        diffs = model_diffs(self.layers, {n: v for n, v in describe(model).items() if n not in skipped})
        if diffs:
            raise ValueError(f"latency table for {self.meta.get('model')!r} does not fit this model: {diffs}")

    # --- files -------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "meta": self.meta, "measured_ms": self.measured_ms, "rest_ms": self.rest_ms,
                "rest_ms_per_element": self.rest_ms_per_element, "scale": self.scale,
                "entries": {k: asdict(e) for k, e in self.entries.items()},
                "layers": {k: asdict(v) for k, v in self.layers.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> LatencyTable:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"latency table schema {data.get('schema')!r} is not {SCHEMA}")
        return cls(meta=data["meta"], entries={k: Entry(**e) for k, e in data["entries"].items()},
                   layers={k: Layer(**v) for k, v in data["layers"].items()}, rest_ms=data["rest_ms"],
                   rest_ms_per_element=data["rest_ms_per_element"], measured_ms=data.get("measured_ms"),
                   scale=data.get("scale", 1.0))

    def save(self, path: str | Path) -> Path:
        """Write the table as JSON (atomically)."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, *, model: nn.Module | None = None, **expected) -> LatencyTable:
        """Read a table and refuse it when `expected` conditions (runtime=, precision=, threads=, dtype=, input=,
        cpu=) or `model` differ from what it was measured for."""
        table = cls.from_dict(json.loads(Path(path).read_text()))
        table.check(**expected)
        if model is not None:
            table.check_model(model)
        return table


# --- layers of a model -------------------------------------------------------------------------------------------
def describe(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """(kind, in, out) of every conv / linear layer, by name: what a table's layers must match."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LAYER_TYPES):
            cin, cout = (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features,
                                                                                             m.out_features)
            out[name] = (type(m).__name__, cin, cout)
    return out


def model_diffs(layers: dict[str, Layer], found: dict[str, tuple[str, int, int]]) -> str:
    """What differs between a table's layers and a model's (empty when the model fits: same names, no layer wider
    than the table's)."""
    missing = sorted(set(found) - set(layers))
    extra = sorted(set(layers) - set(found))
    wider = [f"{n} {found[n][1]}->{found[n][2]} (table {layers[n].cin}->{layers[n].cout})" for n in found
             if n in layers and (found[n][1] > layers[n].cin or found[n][2] > layers[n].cout)]
    kind = [f"{n} is a {found[n][0]}" for n in found if n in layers and not layers[n].key.startswith(found[n][0])]
    parts = [(f"{len(missing)} layer(s) not in the table", missing), (f"{len(extra)} table layer(s) not in the "
             "model", extra), ("wider than the table", wider), ("other kind", kind)]
    return "; ".join(f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                     for label, names in parts if names)


def fingerprint(found: dict[str, tuple[str, int, int]]) -> str:
    """A short hash of a model's layer names, kinds and widths."""
    return hashlib.sha1(json.dumps(sorted(found.items())).encode()).hexdigest()[:12]


def layer_widths(model: nn.Module, layers: Iterable[str]) -> dict[str, tuple[int, int]]:
    found = describe(model)
    return {name: found[name][1:] for name in layers if name in found}


# --- allocation --------------------------------------------------------------------------------------------------
class _Sides:
    """For each scored group: its removal order (weakest first, floors respected), the stops a removal may end at
    (kept counts on the group's width step), and how many positions of each table layer's in / out it takes."""

    def __init__(self, groups: list[ChannelGroup], scores: dict[int, np.ndarray], table: LatencyTable,
                 min_keep: float, round_to: int | None):
        self.groups = {g.id: g for g in groups if g.id in scores}
        self.order, self.cumscore, self.lost, self.stops, self.steps = {}, {}, {}, {}, {}
        for gid, g in self.groups.items():
            channels = np.flatnonzero(g.prunable)
            ranked = channels[np.argsort(scores[gid][channels], kind="stable")]
            floor = _Floor(g, min_keep)
            order = np.array([c for c in ranked.tolist() if floor.take(c)], dtype=np.int64)
            self.order[gid] = order
            self.cumscore[gid] = np.concatenate([[0.0], np.cumsum(scores[gid][order])])
            self.lost[gid] = self._lost(g, order, table)
            self.steps[gid] = round_to or _group_step(table, self.lost[gid])
            self.stops[gid] = _stops(g.size, len(order), self.steps[gid])

    @staticmethod
    def _lost(g: ChannelGroup, order: np.ndarray, table: LatencyTable) -> dict[tuple[str, str], np.ndarray]:
        """(layer, role) -> positions lost after removing the first j channels of `order`, for j = 0..len."""
        out = {}
        for m in g.members:
            if m.module in table.layers and m.role in ("in", "out"):
                held = np.bincount(m.index, minlength=g.size)[order]
                out[(m.module, m.role)] = out.get((m.module, m.role), 0) + np.concatenate([[0], np.cumsum(held)])
        return out


def _group_step(table: LatencyTable, sides: Iterable[tuple[str, str]]) -> int:
    """The width step of the group's costliest layer: its kernel's padding is what a block must not waste (a tiny
    layer's step is noise-prone and its waste cheap)."""
    sides = list(sides)
    if not sides:
        return 1
    name, role = max(sides, key=lambda side: table.layer_ms(side[0], *table.full_widths()[side[0]]))
    return table.step(name, role)


def _stops(size: int, removable: int, step: int) -> list[int]:
    """Removal counts j (1..removable) that leave a multiple of `step` channels; the floor itself if none does."""
    stops = [j for j in range(1, removable + 1) if (size - j) % step == 0]
    return stops or ([removable] if removable else [])


class _State:
    """Widths of the table's layers as removals advance, and the predicted latency they give."""

    def __init__(self, table: LatencyTable, sides: _Sides):
        self.table, self.sides = table, sides
        self.taken = {gid: 0 for gid in sides.groups}
        self.full = table.full_widths()
        self.users: dict[str, list[int]] = {}  # layer -> groups that change its widths
        for gid, lost in sides.lost.items():
            for name in {name for name, _ in lost}:
                self.users.setdefault(name, []).append(gid)

    def widths(self, name: str, override: tuple[int, int] | None = None) -> tuple[int, int]:
        cin, cout = self.full[name]
        for gid in self.users.get(name, []):
            j = override[1] if override and override[0] == gid else self.taken[gid]
            lost = self.sides.lost[gid]
            cin -= int(lost[(name, "in")][j]) if (name, "in") in lost else 0
            cout -= int(lost[(name, "out")][j]) if (name, "out") in lost else 0
        return cin, cout

    def cost(self, names: Iterable[str], override=None) -> float:
        total = 0.0
        for name in names:
            cin, cout = self.widths(name, override)
            total += self.table.layer_ms(name, cin, cout) + self.table.volume_ms(name, cout)
        return total

    def next_stop(self, gid: int) -> int | None:
        return next((j for j in self.sides.stops[gid] if j > self.taken[gid]), None)

    def gain(self, gid: int) -> tuple[float, float, int] | None:
        """(importance removed, latency saved, new count) of the group's next block that saves time (a block
        inside a flat stretch of the table is merged with the next), or None at its floor."""
        names = {name for name, _ in self.sides.lost[gid]}
        now, cum, j = self.cost(names), self.sides.cumscore[gid], None
        for j in (j for j in self.sides.stops[gid] if j > self.taken[gid]):
            saved = now - self.cost(names, (gid, j))
            if saved > 1e-9:
                return cum[j] - cum[self.taken[gid]], saved, j
        return None if j is None else (cum[j] - cum[self.taken[gid]], 0.0, j)

    def removal(self) -> Removal:
        return {gid: np.sort(self.sides.order[gid][:j]) for gid, j in self.taken.items() if j > 0}


def select_latency(groups: list[ChannelGroup], scores: dict[int, np.ndarray], *, table: LatencyTable,
                   target: float, min_keep: float = 0.1, round_to: int | None = None) -> Removal:
    """Remove channel blocks by least importance per millisecond saved until the predicted latency is at most
    `target` × the unpruned model's (a greedy knapsack, as HALP).

    Each group is cut in blocks that end on its width step (the largest step the table measured for its layers,
    or `round_to` when given): where 64 channels cost what 57 do, 64 are kept. Raises when the floors (`min_keep`)
    stop the removal above the target, naming the layers at their floor and the latency reachable.
    """
    sides = _Sides(groups, scores, table, min_keep, round_to)
    state = _State(table, sides)
    base, now = table.predict(), table.predict()
    gains = {gid: state.gain(gid) for gid in sides.groups}
    while now > target * base:
        best = _best(gains, now - target * base)
        if best is None:
            _unreachable(table, sides, state, target, now / base, min_keep)
        _, saved, j = gains[best]
        state.taken[best] = j
        now -= saved
        touched = {name for name, _ in sides.lost[best]}
        for gid in {g for name in touched for g in state.users[name]}:
            gains[gid] = state.gain(gid)
    return state.removal()


def _best(gains: dict[int, tuple[float, float, int] | None], need: float) -> int | None:
    """The group whose next block costs least importance per millisecond saved (blocks that save nothing wait);
    when some block alone saves the `need`ed milliseconds, the least important of those (no needless overshoot)."""
    live = {gid: g for gid, g in gains.items() if g is not None and g[1] > 1e-9}
    enough = {gid: g[0] for gid, g in live.items() if g[1] >= need}
    if enough:
        return min(enough, key=enough.get)
    ratio = {gid: imp / saved for gid, (imp, saved, _) in live.items()}
    return min(ratio, key=ratio.get) if ratio else None


def _unreachable(table, sides, state, target, reached, min_keep) -> None:
    floor = [g.modules("out")[0] for gid, g in sides.groups.items()
             if state.next_stop(gid) is None and g.modules("out")]
    raise ValueError(f"target_latency {target:.3f} is out of reach: removing every channel the per-layer floors allow "
                     f"(min_keep={min_keep}) leaves a predicted {reached:.3f} of the latency "
                     f"({reached * table.predict():.1f} ms of {table.predict():.1f} ms on {table.meta.get('runtime')})"
                     f"; layers at their floor: {', '.join(floor[:8])}{' ...' if len(floor) > 8 else ''}")


def latency_removal(model: nn.Module, groups: list[ChannelGroup], scores: dict[int, np.ndarray], *,
                    table: LatencyTable | None, target: float, min_keep: float = 0.1,
                    round_to: int | None = None) -> Removal:
    """`prune(target_latency=, latency=)`: check the table fits the model, then allocate."""
    if not isinstance(table, LatencyTable):
        raise ValueError("target_latency needs latency=<LatencyTable> (measure one with "
                         "segprune.eval.latency.measure_latency_table, or LatencyTable.load a saved one)")
    if not 0 < target <= 1:
        raise ValueError(f"target_latency must be in (0, 1], got {target}")
    table.check_model(model)
    return select_latency(groups, scores, table=table, target=target, min_keep=min_keep, round_to=round_to)


def next_target(tries: list[tuple[float, float]], target: float) -> float | None:
    """The target to allocate for next, from earlier tries' (allocated for, measured) ratios, so that the measured
    ratio lands on `target`: interpolated inside the tightest bracket once tries measured on either side of it,
    else scaled by the last try's error (measured = allocated × e: allocate target / e); None when that repeats
    an earlier allocation (the steps cannot get closer).

    The bracket is the largest allocation that measured below the target and the smallest that measured above,
    by allocation, not by reading: readings are noisy, and a bracket chosen by its readings can keep pointing back
    at a try already made (SegNet on OpenVINO bf16: 0.676 measured above 0.704), ending the loop early. When noise
    inverts the bracket (the larger allocation measured lower), its midpoint."""
    found = bracket(tries, target)
    if found:
        (a0, m0), (a1, m1) = found
        inverted = a0 >= a1 or m1 <= m0
        aim = (a0 + a1) / 2 if inverted else a0 + (target - m0) * (a1 - a0) / (m1 - m0)
    else:
        a, m = tries[-1]
        aim = a * target / m
    aim = float(min(1.0, max(0.01, aim)))
    return None if any(abs(aim - a) < 1e-3 for a, _ in tries) else aim


def bracket(tries: list[tuple[float, float]], target: float):
    """((a0, m0), (a1, m1)): the largest allocation that measured below `target` and the smallest that measured
    above it, from (allocated for, measured) tries; None until tries measured on both sides."""
    below = [(a, m) for a, m in tries if m < target]
    above = [(a, m) for a, m in tries if m > target]
    return (max(below), min(above)) if below and above else None


# --- helpers -----------------------------------------------------------------------------------------------------
def _pad(c: float, step: int) -> float:
    return float(math.ceil(c / step) * step) if step > 1 and c > 0 else float(c)


def _interp1(xs: np.ndarray, x: float) -> tuple[int, int, float]:
    """Indices (i, k) and weight of k for linear interpolation; below the grid towards zero, above it linear."""
    if len(xs) == 1:
        return 0, 0, 0.0
    i = int(np.clip(np.searchsorted(xs, x) - 1, 0, len(xs) - 2))
    return i, i + 1, (x - xs[i]) / (xs[i + 1] - xs[i])


def _interp2(ins: np.ndarray, outs: np.ndarray, ms: np.ndarray, cin: float, cout: float) -> float:
    """Bilinear in (in, out); below the smallest sampled width the cost falls linearly towards zero."""
    scale = 1.0
    if len(ins) > 1 and cin < ins[0]:
        scale, cin = scale * max(cin, 0) / ins[0], ins[0]
    if len(outs) > 1 and cout < outs[0]:
        scale, cout = scale * max(cout, 0) / outs[0], outs[0]
    i0, i1, wi = _interp1(ins, cin)
    o0, o1, wo = _interp1(outs, cout)
    row0 = ms[i0, o0] * (1 - wo) + ms[i0, o1] * wo
    row1 = ms[i1, o0] * (1 - wo) + ms[i1, o1] * wo
    return scale * max(row0 * (1 - wi) + row1 * wi, 0.0)


def _plain(v):
    """Compare tuples / torch sizes with what JSON gives back (lists)."""
    return list(v) if isinstance(v, (tuple, list)) or type(v).__name__ == "Size" else v
