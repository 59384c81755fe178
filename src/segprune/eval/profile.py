"""Cost of a model: parameters, MACs, file size and measured latency.

Timings follow one protocol everywhere: eval mode, ``torch.inference_mode()``, warm-up runs first,
``torch.cuda.synchronize()`` around each run only for CUDA inputs, median and p90 reported, and
every row records device, dtype, threads, batch and input size so rows can be compared honestly.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters, counting a shared parameter once."""
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Context manager: ``model`` in eval mode for the block, then every submodule's own mode restored."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


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


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass in eval mode, as counted by ``FlopCounterMode``.

    Returns:
        Total FLOPs // 2. Ops the counter has no formula for (elementwise ops, BN, pooling) add nothing.
    """
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), counter:
        model(example_input)
    return counter.get_total_flops() // 2


def size_bytes(model: nn.Module) -> int:
    """Size in bytes of the model's state dict written with ``safetensors`` (header included)."""
    # safetensors refuses tensors that share memory (tied weights) or are non-contiguous views: copy each.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.safetensors")
        save_file(state, path)
        return os.path.getsize(path)


def _sync(example_input: torch.Tensor) -> None:
    """Wait for queued kernels, only where there is a queue (CUDA)."""
    if example_input.is_cuda:
        torch.cuda.synchronize(example_input.device)


def _time_runs(model: nn.Module, example_input: torch.Tensor, *, runs: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``runs`` forward passes after ``warmup`` untimed ones (caller sets the mode)."""
    for _ in range(warmup):
        model(example_input)
    times = []
    for _ in range(runs):
        _sync(example_input)
        start = time.perf_counter()
        model(example_input)
        _sync(example_input)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _metadata(example_input: torch.Tensor, runs: int) -> dict:
    """The conditions a timing was taken under."""
    return dict(
        runs=runs,
        device=str(example_input.device),
        dtype=str(example_input.dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        batch=int(example_input.shape[0]),
        input_size=list(example_input.shape[2:]),
    )


def measure_latency(model: nn.Module, example_input: torch.Tensor, *, warmup=5, runs=30, threads=None) -> dict:
    """Latency of one forward pass in eval mode under ``torch.inference_mode()``.

    Args:
        model: Model, already on the input's device.
        example_input: Input batch (N, C, H, W).
        warmup: Untimed runs first.
        runs: Timed runs.
        threads: Intra-op CPU threads for the measurement; the previous setting is restored.

    Returns:
        A dict with ``median_ms``, ``p90_ms``, ``runs``, ``device``, ``dtype``, ``threads``,
        ``batch`` and ``input_size`` ([H, W]).
    """
    with _num_threads(threads), eval_mode(model), torch.inference_mode():
        times = _time_runs(model, example_input, runs=runs, warmup=warmup)
        meta = _metadata(example_input, runs)
    return dict(median_ms=statistics.median(times), p90_ms=float(np.percentile(times, 90)), **meta)


def compare_latency(
    models: dict[str, nn.Module], example_input: torch.Tensor, *, rounds=7, runs=10, warmup=3, threads=None
) -> dict[str, dict]:
    """Latency of several models measured interleaved, so that drift of the machine hits all alike.

    Every model is warmed up, then each round times ``runs`` passes of every model in turn; the
    starting model rotates from round to round so none always runs right after the same one.

    Args:
        models: Models by name, on the input's device.
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
    with _num_threads(threads), contextlib.ExitStack() as stack, torch.inference_mode():
        for model in models.values():
            stack.enter_context(eval_mode(model))
            _time_runs(model, example_input, runs=0, warmup=warmup)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                times[name].append(_time_runs(models[name], example_input, runs=runs, warmup=0))
        meta = _metadata(example_input, runs)
    return {name: _summary(per_round, meta, rounds) for name, per_round in times.items()}


def _summary(per_round: list[list[float]], meta: dict, rounds: int) -> dict:
    """Median of per-round medians and p90 of all runs, with the measurement metadata."""
    median = statistics.median(statistics.median(t) for t in per_round)
    p90 = float(np.percentile([x for t in per_round for x in t], 90))
    return dict(median_ms=median, p90_ms=p90, rounds=rounds, **meta)


def profile(model: nn.Module, example_input: torch.Tensor) -> dict:
    """Static cost of ``model``: ``params``, ``macs`` (one pass on ``example_input``) and ``size_bytes``."""
    return dict(params=count_params(model), macs=count_macs(model, example_input), size_bytes=size_bytes(model))
