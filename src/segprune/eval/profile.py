"""Cost of a model: parameters, MACs (total and per layer), file size, peak memory and measured latency.

Timings follow one protocol everywhere: eval mode, ``torch.inference_mode()``, warm-up runs first,
``torch.cuda.synchronize()`` around each run only for CUDA inputs, median and p90 reported, and
every row records backend, device, dtype, threads, batch and input size so rows can be compared honestly.

What is timed is a model compiled by a registered runtime (:mod:`segprune.export.runtimes`; :func:`as_runner`):
an ``nn.Module`` runs eager, an ONNX file path or an ``onnxruntime.InferenceSession`` runs on onnxruntime, and
``segprune.export.deploy.deploy`` compiles for any runtime (OpenVINO, TensorRT, ...) after checking its outputs, so
``measure_latency(model, x)``, ``measure_latency("model.onnx", x)`` and
``compare_latency({"eager": model, "openvino": deploy(model, x, "openvino")}, x)`` all work. The input is converted
for the runtime once, before the clock starts (a NumPy copy for onnxruntime and OpenVINO).

Peak inference memory (:func:`peak_memory`) is the most memory held by tensors during one forward pass, above what
was held before it (weights and input excluded):
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (includes cuDNN workspaces).
- CPU: PyTorch keeps no CPU allocator statistics, and process RSS is useless in-process (the C allocator keeps
  freed pages, so a second pass shows no growth). So every tensor an op returns is counted while its storage is
  alive (a ``TorchDispatchMode`` adds a storage's bytes when it first appears and a ``weakref.finalize`` on the
  storage subtracts them when it is freed); the peak of that running total is reported. It is deterministic and
  allocator-independent; scratch buffers that a kernel allocates and frees inside itself (oneDNN workspaces) are
  not seen.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import tempfile
import time
import weakref
from collections import Counter
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from segprune._utils import eval_mode
from segprune.export.deploy import deploy
from segprune.export.runtimes import EAGER, ONNXRUNTIME, Compiled, get_runtime


def count_params(model: nn.Module) -> int:
    """Number of parameters, counting a shared parameter once."""
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def _num_threads(threads: int | None):
    """Run the block with ``threads`` intra-op CPU threads (unchanged when None), then restore."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --- MACs ---------------------------------------------------------------------------------------------------------
class _Totals:
    """Stands in for FlopCounterMode's module tracker, whose backward hooks fail inside some models (transformers'
    OneFormer: "Expected gradient function to be set"): every op counts towards the total only. Per-module counts
    are ours (:class:`_PerModule`, forward hooks), so nothing is lost."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def _flop_counter() -> FlopCounterMode:
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _Totals()
    return counter


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass in eval mode, as counted by ``FlopCounterMode``.

    Returns:
        Total FLOPs // 2. Ops the counter has no formula for (elementwise ops, BN, pooling) add nothing.
    """
    counter = _flop_counter()
    with eval_mode(model), torch.no_grad(), counter:
        model(example_input)
    return counter.get_total_flops() // 2


class _PerModule:
    """Attributes the FLOPs counted so far to the innermost module call in progress (kept by module hooks)."""

    def __init__(self, counter: FlopCounterMode):
        self.counter, self.stack, self.mark, self.flops = counter, [], 0, Counter()

    def _flush(self) -> None:
        now = self.counter.get_total_flops()
        if self.stack:
            self.flops[self.stack[-1]] += now - self.mark
        self.mark = now

    def enter(self, name: str, *_) -> None:
        self._flush()
        self.stack.append(name)

    def leave(self, name: str, *_) -> None:
        self._flush()
        self.stack.pop()


def macs_per_layer(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """MACs of one eval-mode forward pass per module (qualified name; ``""`` is the model's own forward).

    Each op counts towards the innermost module running it, so a conv's MACs sit under the conv's name and a
    functional op (``F.conv2d``, ``matmul``) under the module whose ``forward`` calls it; the values add up to
    :func:`count_macs` (to rounding). A module called twice counts twice; modules without MACs are left out.
    """
    counter = _flop_counter()
    tracker, handles = _PerModule(counter), []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(partial(tracker.enter, name)))
        handles.append(module.register_forward_hook(partial(tracker.leave, name), always_call=True))
    try:
        with eval_mode(model), torch.no_grad(), counter:
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return {name: flops // 2 for name, flops in tracker.flops.items() if flops}


# --- sizes --------------------------------------------------------------------------------------------------------
def size_bytes(model: nn.Module) -> int:
    """Size in bytes of the model's state dict written with ``safetensors`` (header included)."""
    # safetensors refuses tensors that share memory (tied weights) or are non-contiguous views: copy each.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.safetensors")
        save_file(state, path)
        return os.path.getsize(path)


def file_bytes(path: str | Path) -> int:
    """Size of a file on disk (a ``weights.safetensors`` or an ``.onnx``), or of every file in a folder."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


# --- peak memory --------------------------------------------------------------------------------------------------
class _LiveTensorBytes(TorchDispatchMode):
    """Running total of the bytes of storages that ops returned and that are still alive; keeps the peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = id(storage)
        if key in self.live:  # a view or an in-place result: storage already counted
            return
        self.live[key] = storage.nbytes()
        self.now += self.live[key]
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)


def peak_memory(model: nn.Module, example_input: torch.Tensor) -> dict:
    """Peak bytes held by tensors during one eval-mode forward pass, above what was held before it.

    Returns:
        ``peak_bytes``, ``device`` and ``method`` (see the module docstring for how CPU and CUDA are measured).
    """
    with eval_mode(model), torch.inference_mode():
        if example_input.is_cuda:
            device = example_input.device
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            model(example_input)
            torch.cuda.synchronize(device)
            peak, method = torch.cuda.max_memory_allocated(device) - base, "torch.cuda.max_memory_allocated"
        else:
            with _LiveTensorBytes() as live:
                out = model(example_input)
                del out
            peak, method = live.peak, "live tensor storages (TorchDispatchMode)"
    return dict(peak_bytes=int(peak), device=str(example_input.device), method=method)


# --- runners ------------------------------------------------------------------------------------------------------
def as_runner(obj, threads: int | None = None) -> Compiled:
    """What is timed: a model compiled by a registered runtime (:mod:`segprune.export.runtimes`). An ``nn.Module``
    runs eager, an ``.onnx`` path or an onnxruntime session on onnxruntime (with ``threads`` intra-op threads), and
    a compiled model (``segprune.export.deploy``: any runtime, checked against eager) is returned as it is."""
    if isinstance(obj, Compiled):
        return obj
    if isinstance(obj, nn.Module):
        return EAGER.compile(obj, None, device=_device(obj), threads=threads)
    if isinstance(obj, (str, os.PathLike)) or hasattr(obj, "get_inputs"):
        return ONNXRUNTIME.compile(obj, None, threads=threads)
    raise TypeError(f"cannot time a {type(obj).__name__}: pass an nn.Module, an .onnx path, an onnxruntime session "
                    "or a model compiled by segprune.export.deploy")


def _device(model: nn.Module) -> str:
    first = next(iter([*model.parameters(), *model.buffers()]), None)
    return first.device.type if first is not None else "cpu"


# --- latency ------------------------------------------------------------------------------------------------------
def _sync(example_input: torch.Tensor) -> None:
    """Wait for queued kernels, only where there is a queue (CUDA)."""
    if example_input.is_cuda:
        torch.cuda.synchronize(example_input.device)


def _time_runs(runner, feed, example_input: torch.Tensor, *, runs: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``runs`` passes after ``warmup`` untimed ones (caller activates the runner; a
    runner on a GPU synchronises inside its run)."""
    for _ in range(warmup):
        runner(feed)
    times = []
    for _ in range(runs):
        _sync(example_input)
        start = time.perf_counter()
        runner(feed)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _metadata(example_input: torch.Tensor, runs: int, runner: Compiled) -> dict:
    """The conditions a timing was taken under (``dtype``: the input's; ``precision``: what the runtime ran)."""
    about = runner.describe()
    return dict(
        runs=runs,
        **about,
        dtype=str(example_input.dtype).removeprefix("torch."),
        batch=int(example_input.shape[0]),
        input_size=list(example_input.shape[2:]),
    )


def measure_latency(model, example_input: torch.Tensor, *, warmup=5, runs=30, threads=None) -> dict:
    """Latency of one forward pass.

    Args:
        model: An ``nn.Module`` (already on the input's device; timed in eval mode under ``inference_mode``), an
            ``.onnx`` path or an onnxruntime session (timed on CPU), or a runner (see :func:`as_runner`).
        example_input: Input batch (N, C, H, W).
        warmup: Untimed runs first.
        runs: Timed runs.
        threads: Intra-op CPU threads for the measurement (PyTorch's setting is restored afterwards; an ONNX path
            gets a session with this many threads; a given session keeps its own).

    Returns:
        A dict with ``median_ms``, ``p90_ms``, ``runs``, ``backend``, ``device``, ``dtype``, ``threads``,
        ``batch`` and ``input_size`` ([H, W]).
    """
    with _num_threads(threads):
        runner = as_runner(model, threads)
        with runner.active():
            times = _time_runs(runner, runner.prepare(example_input), example_input, runs=runs, warmup=warmup)
        meta = _metadata(example_input, runs, runner)
    return dict(median_ms=statistics.median(times), p90_ms=float(np.percentile(times, 90)), **meta)


def compare_latency(models: dict, example_input: torch.Tensor, *, rounds=7, runs=10, warmup=3, threads=None
                    ) -> dict[str, dict]:
    """Latency of several models measured interleaved, so that drift of the machine hits all alike.

    Every model is warmed up, then each round times ``runs`` passes of every model in turn; the
    starting model rotates from round to round so none always runs right after the same one.

    Args:
        models: By name: ``nn.Module`` s on the input's device, ``.onnx`` paths, onnxruntime sessions or runners
            (mixing them compares backends).
        example_input: Input batch (N, C, H, W).
        rounds: Number of rounds.
        runs: Timed runs per model per round.
        warmup: Untimed runs per model before the first round.
        threads: Intra-op CPU threads for the measurement; the previous setting is restored.

    Returns:
        Per name, ``median_ms`` (median over rounds of the per-round medians), ``p90_ms`` (over all
        timed runs), ``rounds`` and the metadata of :func:`measure_latency` (``runs`` is per round).
    """
    names, times = list(models), {name: [] for name in models}
    if not names:
        return {}
    with _num_threads(threads), contextlib.ExitStack() as stack:
        runners = {name: as_runner(obj, threads) for name, obj in models.items()}
        feeds = {}
        for name, runner in runners.items():
            stack.enter_context(runner.active())
            feeds[name] = runner.prepare(example_input)
            _time_runs(runner, feeds[name], example_input, runs=0, warmup=warmup)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                times[name].append(_time_runs(runners[name], feeds[name], example_input, runs=runs, warmup=0))
        meta = {name: _metadata(example_input, runs, runner) for name, runner in runners.items()}
    return {name: _summary(per_round, meta[name], rounds) for name, per_round in times.items()}


def _summary(per_round: list[list[float]], meta: dict, rounds: int) -> dict:
    """Median of per-round medians and p90 of all runs, with the measurement metadata."""
    median = statistics.median(statistics.median(t) for t in per_round)
    p90 = float(np.percentile([x for t in per_round for x in t], 90))
    return dict(median_ms=median, p90_ms=p90, rounds=rounds, **meta)


def latency_rows(model: nn.Module, example_input: torch.Tensor, *, onnx: str | Path | None = None,
                 threads: int = 1, warmup: int = 5, runs: int = 30, cuda: bool | None = None,
                 runtimes: Sequence[str] | None = None) -> list[dict]:
    """Latency of one model on several runtimes, one row each (as :func:`measure_latency`).

    Args:
        onnx: the model's exported file: onnxruntime times it (when ``runtimes`` is None).
        threads: intra-op CPU threads of every CPU runtime.
        cuda: also eager CUDA fp32 and fp16 (None: when a GPU is present; with ``runtimes`` None).
        runtimes: runtime specs (``"openvino"``, ``"openvino:fp32"``, ``"tensorrt:fp16"``; see
            :mod:`segprune.export.runtimes`), each deployed (exported where needed, outputs checked against eager)
            on its first device; a runtime that is not installed or cannot compile the model gives a row with
            ``error`` (one line) instead, and the others are still measured. None: eager CPU, onnxruntime with
            ``onnx``, eager CUDA as ``cuda`` says.
    """
    on_cpu = all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    cpu_model, x = model if on_cpu else copy.deepcopy(model).cpu(), example_input.cpu().float()
    if runtimes is None:
        rows = [measure_latency(cpu_model, x, warmup=warmup, runs=runs, threads=threads)]
        if onnx is not None:
            rows.append(measure_latency(onnx, x, warmup=warmup, runs=runs, threads=threads))
        if cuda or (cuda is None and torch.cuda.is_available()):
            rows += [_row(cpu_model, x, spec, "cuda", threads, warmup, runs) for spec in ("eager:fp32", "eager:fp16")]
        return rows
    return [_row(cpu_model, x, spec, get_runtime(spec).devices[0], threads, warmup, runs) for spec in runtimes]


def _row(model: nn.Module, x: torch.Tensor, spec: str, device: str, threads: int, warmup: int, runs: int) -> dict:
    """One runtime's latency row, or ``{runtime, error}`` when it cannot run the model here."""
    try:
        with tempfile.TemporaryDirectory() as folder:
            compiled = deploy(model, x, spec, device=device, threads=threads, folder=folder)
            row = measure_latency(compiled, x, warmup=warmup, runs=runs, threads=threads)
    except (ImportError, ValueError, RuntimeError) as err:
        return dict(runtime=spec, device=device, error=str(err).splitlines()[0])
    return dict(runtime=spec, **row, parity=compiled.parity)


def profile(model: nn.Module, example_input: torch.Tensor, *, layers: bool = False, memory: bool = False,
            onnx: str | Path | None = None) -> dict:
    """Static cost of ``model``: ``params``, ``macs`` (one pass on ``example_input``) and ``size_bytes``.

    Args:
        layers: Also ``macs_per_layer`` ({module name: MACs}, :func:`macs_per_layer`).
        memory: Also ``peak_memory`` (:func:`peak_memory`).
        onnx: The model's exported ``.onnx`` file: also ``onnx_bytes``, its size.
    """
    out = dict(params=count_params(model), macs=count_macs(model, example_input), size_bytes=size_bytes(model))
    if layers:
        out["macs_per_layer"] = macs_per_layer(model, example_input)
    if memory:
        out["peak_memory"] = peak_memory(model, example_input)
    if onnx is not None:
        out["onnx_bytes"] = file_bytes(onnx)
    return out
