"""Measure a :class:`segprune.prune.latency.LatencyTable`: time every layer shape of a model on the deployment
runtime at sampled kept widths, probe the runtime's width steps, and fit the rest of the model to whole-model
timings.

Why per shape, not per layer: ResNet-50 repeats a handful of shapes (one key serves every 3×3 conv of layer3), so a
table costs minutes, not hours, and serves any model with the same shapes. Layers are timed alone on random
inputs, as the fused model runs them (a convolution with bias; BN folded), with the thread count of the
deployment. A machine under load makes timings spread: the spread of repeated timings is recorded, and a warning
says when it exceeds ``spread_warn``.

Runtimes: any registered one (:mod:`segprune.export.runtimes`: eager, onnxruntime, OpenVINO, TensorRT), through
:class:`RuntimeTimer` (each layer as the runtime runs it; each whole model deployed and checked), or any object with
its methods (tests use one of known cost). Each runtime's width steps are probed, not assumed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import math
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segprune._utils import eval_mode
from segprune.eval.profile import as_runner
from segprune.export.deploy import deploy
from segprune.export.fuse import fuse_conv_bn
from segprune.export.runtimes import parse
from segprune.prune.api import prune
from segprune.prune.graph import channel_groups
from segprune.prune.latency import (
    LAYER_TYPES,
    Entry,
    LatencyTable,
    Layer,
    describe,
    fingerprint,
    layer_widths,
)

FRACTIONS = (0.1, 0.4, 0.7, 1.0)  # sampled widths, as fractions of the widest layer of a shape
GRID_STEP = 16  # sampled widths are multiples of this (the widest kernel block seen on x86 CPUs)
MISFIT_WARN = 0.10  # warn when the table misprices a whole model it was fitted to by more than this
PROBE = (1, 2, 4, 8, 16, 32, 64)  # candidate width steps (oneDNN on AVX-512 pads inputs to 64 at some shapes)


@dataclass
class LayerSpec:
    """What a layer's latency depends on, besides its widths."""

    kind: str
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    depthwise: bool
    in_shape: tuple[int, ...]  # (N, H, W) for a conv, leading dims for a linear layer
    out_hw: tuple[int, ...]

    @property
    def key(self) -> str:
        dims = lambda t: "x".join(map(str, t))  # noqa: E731
        if self.kind == "Linear":
            return f"Linear n{dims(self.in_shape)}"
        return (f"Conv2d k{dims(self.kernel)} s{dims(self.stride)} p{dims(self.padding)} d{dims(self.dilation)}"
                f"{' dw' if self.depthwise else ''} n{self.in_shape[0]} in{dims(self.in_shape[1:])}")


# --- runtimes ----------------------------------------------------------------------------------------------------
class RuntimeTimer:
    """Times layers and whole models on one registered runtime (:mod:`segprune.export.runtimes`), as a table needs.

    A layer runs as that runtime runs it: the module itself where the runtime compiles modules (eager), a one-node
    ONNX graph made directly (no exporter, milliseconds) where it compiles ONNX. Whole models are deployed
    (exported, compiled, outputs checked against eager) and timed interleaved. Any object with ``name``,
    ``precision``, ``versions``, ``time_layer`` and ``time_models`` can stand in (tests use one of known cost).

    Args:
        runtime: a runtime spec, ``"name"`` or ``"name:precision"``.
        threads: intra-op CPU threads.
        precision: overrides the spec's precision.
        device: where the runtime runs ("cpu", or "cuda" for eager, onnxruntime-gpu and TensorRT).
        folder: keep whole-model exports here (reused by name).
    """

    def __init__(self, runtime: str = "eager", threads: int = 1, *, precision: str | None = None,
                 device: str | None = None, folder: Path | None = None):
        self.runtime, spec_precision = parse(runtime)
        self.precision = self.runtime.check_precision(precision or spec_precision)
        self.name, self.threads, self.folder = self.runtime.name, threads, folder
        self.device = device or self.runtime.devices[0]
        self.runtime.require(self.device)

    def versions(self) -> dict:
        out = {"torch": torch.__version__}
        if self.runtime.module is not None:
            out[self.runtime.module] = importlib.metadata.version(self.runtime.module)
        return out

    def compile(self, source, x: torch.Tensor):
        return self.runtime.compile(source, x, device=self.device, precision=self.precision, threads=self.threads)

    def time_layer(self, spec: LayerSpec, cin: int, cout: int, runs: int) -> list[float]:
        module, x = _layer(spec, cin, cout)
        with tempfile.TemporaryDirectory() as tmp:
            source = module
            if self.runtime.source == "onnx":
                source = Path(tmp) / "layer.onnx"
                _one_node_onnx(module, x, [spec.in_shape[0], cout, *spec.out_hw], source)
            compiled = self.compile(source, x)
        feed = compiled.prepare(x)
        with _threads(self.threads), compiled.active():
            return _timed(lambda: compiled(feed), runs)

    def time_models(self, models: dict[str, nn.Module], x: torch.Tensor, rounds: int) -> dict:
        with contextlib.ExitStack() as stack:
            folder = self.folder or Path(stack.enter_context(tempfile.TemporaryDirectory()))
            compiled = {label: deploy(m, x, self.name, precision=self.precision, device=self.device,
                                      threads=self.threads, folder=folder, name=label) for label, m in models.items()}
            self.inference_precision = next(iter(compiled.values())).inference_precision
            return time_interleaved(compiled, x, rounds=rounds, threads=self.threads)


# --- the table ---------------------------------------------------------------------------------------------------
def measure_latency_table(model: nn.Module, example_input: torch.Tensor, *, runtime="eager", threads: int = 1,
                          precision: str | None = None,
                          name: str | None = None, runs: int = 3, rounds: int = 3, table: LatencyTable | None = None,
                          calibrate: bool = True, spread_warn: float = 0.10, onnx_dir: Path | None = None,
                          fractions=FRACTIONS) -> LatencyTable:
    """Measure the latency table of `model` at `example_input`'s shape on `runtime`.

    Args:
        model: the unpruned model (eval mode is used); it is not modified.
        example_input: the deployment input (N, C, H, W); its shape is part of the table's conditions.
        runtime: a registered runtime spec (``"eager"``, ``"onnxruntime"``, ``"openvino"``, ``"openvino:fp32"``,
            ...; see :mod:`segprune.export.runtimes`) or an object with the methods of :class:`RuntimeTimer`.
        precision: the runtime's precision (default: the spec's, else the runtime's first).
        threads: intra-op threads, as deployed (part of the conditions).
        name: the model's name, recorded and shown when a table is refused.
        runs: timed runs per sampled width (minimum kept; one untimed run first).
        rounds: interleaved rounds of the whole-model timings that fit the rest of the model.
        table: an earlier table of the same conditions: shapes it already holds are not measured again.
        calibrate: fit the non-layer term to the whole model and to a uniform 50 % pruning of it (two points);
            False: to the whole model only (the rest is then a constant).
        spread_warn: warn when the spread (max - min) / median of repeated timings exceeds this.
        onnx_dir: keep whole-model ONNX exports here (reused by name).
        fractions: sampled widths, as fractions of the widest layer of each shape.
    """
    rt = RuntimeTimer(runtime, threads, precision=precision, folder=onnx_dir) if isinstance(runtime, str) else runtime
    start, x = time.perf_counter(), example_input
    found, specs = describe(model), layer_specs(model, x)
    conditions = {"runtime": rt.name, "precision": getattr(rt, "precision", "fp32"), "threads": threads,
                  "dtype": str(x.dtype).removeprefix("torch."), "input": list(x.shape), "cpu": cpu_model()}
    if table is not None:
        table.check(**conditions)
    prunable = prunable_sides(model, x)
    out = LatencyTable(meta={**conditions, "model": name or type(model).__name__, "fingerprint": fingerprint(found),
                             **rt.versions(), "runs": runs, "fractions": list(fractions),
                             "not_run": sorted(set(found) - set(specs))})
    out.layers = {n: Layer(s.key, found[n][1], found[n][2], int(math.prod(s.out_hw)), s.depthwise)
                  for n, s in specs.items()}
    spreads = []
    out.entries = _entries(rt, specs, out.layers, prunable, table, runs, fractions, spreads)
    fitted = _fit_rest(out, rt, model, x, rounds, calibrate, spreads)
    out.meta["inference_precision"] = getattr(rt, "inference_precision", conditions["precision"])
    out.meta.update({"layer_spread_median": round(statistics.median(spreads), 4) if spreads else None,
                     "whole_model_spread": fitted, "seconds": round(time.perf_counter() - start, 1),
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    _warn_spread(spreads, fitted, spread_warn)
    return out


class LatencyMeter:
    """``prune(target_latency=..., measure=LatencyMeter(model, x, "openvino"))``: the measured latency of a pruning
    of ``model`` on a runtime, as a fraction of ``model``'s, both Conv+BN fused as deployed, timed interleaved
    (``rounds`` passes each, alternating), outputs checked against eager first.

    Returns, per call, ``ratio`` (median pruned / median unpruned), ``ms``, ``base_ms`` and ``spread`` (the larger
    (max - min) / median of the two)."""

    def __init__(self, model: nn.Module, example: torch.Tensor, runtime: str = "eager", *, threads: int = 1,
                 precision: str | None = None, rounds: int = 5, folder: Path | None = None):
        self.timer = RuntimeTimer(runtime, threads, precision=precision)
        self.x, self.rounds, self.calls = example, rounds, 0
        self.stack = contextlib.ExitStack()
        self.folder = folder or Path(self.stack.enter_context(tempfile.TemporaryDirectory(prefix="segprune-meter-")))
        self.base = self._deploy(model, "unpruned")

    def _deploy(self, model: nn.Module, name: str):
        with eval_mode(model):
            fused = fuse_conv_bn(model, self.x)
        t = self.timer
        return deploy(fused, self.x, t.name, precision=t.precision, device=t.device, threads=t.threads,
                      folder=self.folder, name=name)

    def __call__(self, pruned: nn.Module) -> dict:
        self.calls += 1
        timed = time_interleaved({"base": self.base, "pruned": self._deploy(pruned, f"try{self.calls}")}, self.x,
                                 rounds=self.rounds, threads=self.timer.threads)
        base, cut = timed["base"], timed["pruned"]
        return {"ratio": cut["median_ms"] / base["median_ms"], "ms": round(cut["median_ms"], 3),
                "base_ms": round(base["median_ms"], 3), "spread": round(max(base["spread"], cut["spread"]), 4)}

    def close(self) -> None:
        self.stack.close()


def layer_specs(model: nn.Module, x: torch.Tensor) -> dict[str, LayerSpec]:
    """The shape of every conv / linear layer's call in one eval-mode forward pass."""
    specs, hooks = {}, []

    def record(name, module, args, out) -> None:  # returns None: a hook's return value would replace the output
        specs.setdefault(name, _spec(module, args[0], out))

    for name, m in model.named_modules():
        if isinstance(m, LAYER_TYPES):
            hooks.append(m.register_forward_hook(functools.partial(record, name)))
    try:
        with torch.inference_mode(), eval_mode(model):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return specs


def prunable_sides(model: nn.Module, x: torch.Tensor) -> set[tuple[str, str]]:
    """(layer, "in" | "out") sides that some pruning can narrow: other sides are sampled at full width only."""
    return {(m.module, m.role) for g in channel_groups(model, x) if not g.frozen for m in g.members}


def cpu_model() -> str:
    path = Path("/proc/cpuinfo")
    if path.exists():
        for line in path.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


# --- sampling ----------------------------------------------------------------------------------------------------
def _entries(rt, specs, layers, prunable, old, runs, fractions, spreads) -> dict[str, Entry]:
    """One entry per shape key: the grid over the widest layer's widths along the sides that can be pruned.

    Every point is timed once per round, all keys in turn, and keeps its minimum over the rounds: load that comes
    and goes on a shared machine then hits every shape alike instead of whichever shape was being timed."""
    by_key: dict[str, list[str]] = {}
    for n, layer in layers.items():
        by_key.setdefault(layer.key, []).append(n)
    todo = {}  # key -> (spec, max_in, max_out, vary_in, vary_out)
    entries = {}
    for key, names in by_key.items():
        max_in, max_out = max(layers[n].cin for n in names), max(layers[n].cout for n in names)
        reuse = old.entries.get(key) if old is not None else None
        if reuse is not None and max_in <= max(reuse.ins) and max_out <= max(reuse.outs):
            entries[key] = reuse
            continue
        vary_in = any((n, "in") in prunable for n in names) and not layers[names[0]].depthwise
        todo[key] = (specs[names[0]], max_in, max_out, vary_in, any((n, "out") in prunable for n in names))
    steps = _probe_all(rt, todo, runs)
    grids = {key: (_grid(mi, fractions, steps[key][0]) if vi else [mi], _grid(mo, fractions, steps[key][1]) if vo
                   else [mo]) for key, (_, mi, mo, vi, vo) in todo.items()}
    points = [(todo[key][0], ci, co) for key, (ins, outs) in grids.items() for ci in ins for co in outs]
    times = iter(_least(t, spreads) for t in _sweep(rt, points, runs))
    for key, (ins, outs) in grids.items():
        ms = _monotone([[next(times) for _ in outs] for _ in ins])
        entries[key] = Entry(ins, outs, ms, *steps[key])
    return entries


def _sweep(rt, points: list[tuple[LayerSpec, int, int]], rounds: int) -> list[list[float]]:
    """Time every (spec, in, out) point once per round, in turn; the times of each point."""
    times = [[] for _ in points]
    for _ in range(rounds):
        for k, (spec, ci, co) in enumerate(points):
            times[k] += rt.time_layer(spec, ci, co, 1)
    return times


def _monotone(ms: list[list[float]]) -> list[list[float]]:
    """Never cheaper with more channels: a noisy sample below a narrower one is raised to it, so that the
    prediction is monotone in width and no removal is predicted to cost time."""
    grid = np.maximum.accumulate(np.maximum.accumulate(np.asarray(ms, dtype=float), axis=0), axis=1)
    return grid.tolist()


def _grid(widest: int, fractions, step: int = 1) -> list[int]:
    """Sampled widths: multiples of the runtime's step (at least GRID_STEP), the widest itself at the top: the
    widths a step-aligned pruning keeps are then sampled exactly."""
    q = max(GRID_STEP, step)
    return sorted({widest, *(min(widest, max(1, q * math.ceil(f * widest / q))) for f in fractions)})


def _probe_points(spec: LayerSpec, max_in: int, max_out: int, axis: str) -> list[tuple[int, int]]:
    """(in, out) widths probing `axis`: a multiple of 64 (or 32), then s - 1 fewer for each candidate step s."""
    widest = max_in if axis == "in" else max_out
    top = 128 if widest >= 128 else (widest // 32) * 32
    if top < 32:
        return []
    other = min(max_out if axis == "in" else max_in, 256)
    widths = [top] + [top - s + 1 for s in PROBE[1:] if s <= top // 2]
    if axis == "in":
        return [(w, other) for w in widths]
    return [(w if spec.depthwise else other, w) for w in widths]


def _probe_all(rt, todo: dict, runs: int, tol: float = 0.05) -> dict[str, tuple[int, int]]:
    """Each key's width steps (in, out): the largest candidate s such that s - 1 fewer channels than the probe's
    multiple run no faster (within `tol`; minimum over rounds)."""
    probes = {(key, axis): _probe_points(spec, mi, mo, axis) for key, (spec, mi, mo, vi, vo) in todo.items()
              for axis, vary in (("in", vi), ("out", vo)) if vary}
    points = [(todo[key][0], ci, co) for (key, _), pts in probes.items() for ci, co in pts]
    least = iter(min(t) for t in _sweep(rt, points, max(runs, 5)))  # small layers: rounds are cheap, noise is not
    steps = {key: [1, 1] for key in todo}
    for (key, axis), pts in probes.items():
        times = [next(least) for _ in pts]
        step = 1
        for s, t in zip(PROBE[1:], times[1:]):
            if t < (1 - tol) * times[0]:
                break
            step = s
        steps[key][0 if axis == "in" else 1] = step
    return {key: tuple(v) for key, v in steps.items()}


def _least(times: list[float], spreads: list[float]) -> float:
    """The minimum of repeated timings (the least disturbed by other processes); their spread is recorded."""
    med = statistics.median(times)
    spreads.append((max(times) - min(times)) / med if med > 0 else 0.0)
    return min(times)


def _fit_rest(table: LatencyTable, rt, model, x, rounds, calibrate, spreads) -> float:
    """Fit the table to whole-model timings: measured = scale × layers + rest_ms_per_element × kept activation
    elements, on the unpruned model and (with `calibrate`) a uniform 50 % pruning; a scale alone with one point.
    Returns the largest spread of the whole-model timings.

    Why a scale and no constant: layers timed alone on a loaded machine run slower than inside the model, and an
    additive constant fitted to that comes out negative and exaggerates every speed-up."""
    with eval_mode(model):
        models = {"unpruned": fuse_conv_bn(model, x)}  # the label names the ONNX export: reused by name
    if calibrate:
        half = prune(model, x, ratio=0.5, select="uniform", criterion="l1").model.eval()
        models["uniform50"] = fuse_conv_bn(half, x)
    timed = rt.time_models(models, x, rounds)
    table.scale, table.rest_ms, table.rest_ms_per_element = 1.0, 0.0, 0.0
    kept = {label: layer_widths(m, table.layers) for label, m in models.items()}
    points = []  # (measured, layers, volume)
    for label, widths in kept.items():
        layers = sum(table.layer_ms(n, *widths[n]) for n in table.layers)
        volume = sum(widths[n][1] * table.layers[n].volume for n in table.layers)
        points.append((timed[label]["min_ms"], layers, volume))
    table.scale = points[0][0] / points[0][1]
    if len(points) > 1:
        (m1, l1, v1), (m2, l2, v2) = points
        det = l1 * v2 - l2 * v1
        scale, per = ((m1 * v2 - m2 * v1) / det, (l1 * m2 - l2 * m1) / det) if det else (0.0, -1.0)
        if scale > 0 and per >= 0:
            table.scale, table.rest_ms_per_element = scale, per
    table.measured_ms = timed["unpruned"]["min_ms"]
    table.meta["calibration"] = {label: {"measured_ms": round(timed[label]["min_ms"], 3), "predicted_ms": round(
        table.predict(widths), 3)} for label, widths in kept.items()}
    _warn_misfit(table)
    return max(_round_spread(t) for t in timed.values())


def _warn_misfit(table: LatencyTable, limit: float = MISFIT_WARN) -> None:
    """Say when the fitted table misprices a whole model it was fitted to (the fit found no positive solution):
    then its layers, timed alone, do not add up to the runtime's compiled graph (OpenVINO on CamVid: the uniform
    50 % pruning ran in 4.66 ms where the table said 5.78), and only measuring the pruned model tells."""
    for label, c in table.meta["calibration"].items():
        off = c["predicted_ms"] / c["measured_ms"] - 1
        if abs(off) > limit:
            warnings.warn(f"segprune: the latency table prices the {label} model {abs(off):.0%} too "
                          f"{'slow' if off > 0 else 'fast'} on {table.meta.get('runtime')} ({c['predicted_ms']} ms "
                          f"predicted, {c['measured_ms']} ms measured): its layers timed alone do not add up to "
                          "the compiled model; allocate with the loop closed (prune(..., measure=LatencyMeter(...)))",
                          stacklevel=4)


def _round_spread(summary: dict) -> float:
    return summary["spread"]


def time_interleaved(models: dict, x: torch.Tensor, *, rounds: int, threads: int, warmup: int = 1) -> dict:
    """One timed pass of every model per round, the order rotating from round to round, so that load drift hits
    all alike. Per name: ``median_ms``, ``min_ms`` (the least disturbed by other processes: what the table fits),
    ``spread`` ((max - min) / median) and the ``times``.

    Models are ``nn.Module`` s, ``.onnx`` paths or runners, as :func:`segprune.eval.profile.compare_latency` takes.
    """
    names, times = list(models), {name: [] for name in models}
    with _threads(threads), contextlib.ExitStack() as stack:
        runners, feeds = {n: as_runner(m, threads) for n, m in models.items()}, {}
        for name, runner in runners.items():
            stack.enter_context(runner.active())
            feeds[name] = runner.prepare(x)
            for _ in range(warmup):
                runner(feeds[name])
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                start = time.perf_counter()
                runners[name](feeds[name])
                times[name].append((time.perf_counter() - start) * 1e3)
    return {n: {"median_ms": statistics.median(t), "min_ms": min(t), "p90_ms": float(np.percentile(t, 90)),
                "spread": (max(t) - min(t)) / statistics.median(t), "times": [round(v, 2) for v in t]}
            for n, t in times.items()}


def _warn_spread(spreads: list[float], whole: float, limit: float) -> None:
    noisy = [s for s in spreads if s > limit]
    if len(noisy) > len(spreads) / 4 or whole > limit:
        warnings.warn(f"segprune: latency timings spread more than {limit:.0%} ({len(noisy)} of {len(spreads)} "
                      f"layer timings; whole model {whole:.0%}): the machine is probably under load, and the table "
                      "is as noisy as it was", stacklevel=3)


# --- one layer ---------------------------------------------------------------------------------------------------
def _spec(m: nn.Module, x: torch.Tensor, out: torch.Tensor) -> LayerSpec:
    if isinstance(m, nn.Linear):
        return LayerSpec("Linear", (), (), (), (), False, tuple(x.shape[:-1]), ())
    depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
    if m.groups > 1 and not depthwise:
        raise ValueError(f"grouped (not depthwise) convolutions are not in latency tables yet: {m}")
    return LayerSpec("Conv2d", tuple(m.kernel_size), tuple(m.stride), tuple(m.padding), tuple(m.dilation),
                     depthwise, (x.shape[0], *x.shape[2:]), tuple(out.shape[2:]))


def _layer(spec: LayerSpec, cin: int, cout: int) -> tuple[nn.Module, torch.Tensor]:
    """A fused-like layer (with bias) of these widths and a random input of its shape."""
    if spec.kind == "Linear":
        return nn.Linear(cin, cout).eval(), torch.randn(*spec.in_shape, cin)
    cin = cout if spec.depthwise else cin
    conv = nn.Conv2d(cin, cout, spec.kernel, spec.stride, spec.padding, spec.dilation,
                     groups=cout if spec.depthwise else 1).eval()
    return conv, torch.randn(spec.in_shape[0], cin, *spec.in_shape[1:])


def _one_node_onnx(module: nn.Module, x: torch.Tensor, y_shape: list[int], path: Path) -> None:
    """A Conv (or Gemm) node with its weights: an ONNX graph made directly, in milliseconds, with no exporter."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w, b = module.weight.detach().numpy(), module.bias.detach().numpy()
    if isinstance(module, nn.Linear):
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
        y_shape = [*x.shape[:-1], w.shape[0]]  # Gemm takes 2-D inputs only: what a classifier's linear sees
    else:
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=list(module.kernel_size),
                                strides=list(module.stride), dilations=list(module.dilation),
                                pads=list(module.padding) * 2, group=module.groups)
    graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(np.ascontiguousarray(w), "w"), numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _timed(fn, runs: int) -> list[float]:
    fn()  # warm-up: allocation, kernel selection
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
