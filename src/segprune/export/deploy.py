"""A model on a deployment runtime, checked: export where the runtime takes ONNX, compile, and compare its outputs
with eager PyTorch's at the tolerance of its precision before any timing of it is trusted.

Why check every time: a runtime that compiles a graph differently (an op it runs in a reference kernel, a layout it
pads, bf16 arithmetic) can be fast and wrong; a speed-up is worth nothing until the outputs agree.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segprune._utils import eval_mode
from segprune.export.onnx import export_onnx, sensitivity
from segprune.export.outputs import Outputs, output_tensors
from segprune.export.runtimes import Compiled, parse

ATOL = 1e-4  # the absolute part of every runtime's tolerance: float32 rounding of logits near zero


class ParityError(ValueError):
    """A runtime's outputs differ from eager PyTorch's by more than its precision allows."""


def deploy(model: nn.Module, example: torch.Tensor, runtime: str = "eager", *, precision: str | None = None,
           device: str = "cpu", threads: int | None = 1, folder: str | Path | None = None, name: str = "model",
           check: bool = True) -> Compiled:
    """``model`` compiled by ``runtime`` (a registered name, ``"name:precision"`` allowed) for ``example``'s shape.

    Args:
        model: the model to deploy (fused or not, as it is given).
        example: an input of the deployment shape; ONNX exports are static at it.
        runtime: a registered runtime (``segprune.export.runtimes.runtime_names()``).
        precision: overrides a precision given in ``runtime``; default the runtime's first.
        device: "cpu" or "cuda", where the runtime offers it.
        threads: intra-op CPU threads of the runtime.
        folder: where ONNX exports are written and reused by ``name`` (a temporary folder when None).
        name: the export's file name (without ``.onnx``).
        check: compare the outputs with eager PyTorch's (:func:`parity`); a mismatch raises :class:`ParityError`.

    Returns:
        the compiled model; ``compiled.parity`` holds the comparison (None without ``check``).
    """
    rt, spec_precision = parse(runtime)
    precision = rt.check_precision(precision or spec_precision)
    rt.require(device)
    with contextlib.ExitStack() as stack:
        source = model
        if rt.source == "onnx":
            where = Path(folder) if folder is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
            source = where / f"{name}.onnx"
            if not source.exists():
                export_onnx(model, example, source, dynamic=False, check=False)
        compiled = rt.compile(source, example, device=device, precision=precision, threads=threads)
    same = getattr(compiled, "model", None) is model and precision == "fp32"  # eager on the model itself: exact
    exact = dict(max_abs_diff=0.0, tolerance=ATOL, mismatched=0.0, floor=0.0, ok=True, unstable=False)
    compiled.parity = (exact if same else parity(compiled, model, example, rt.tolerance[precision])) if check else None
    if compiled.parity is not None and not compiled.parity["ok"]:
        p = compiled.parity
        raise ParityError(f"{rt.name} ({precision}, runs {compiled.inference_precision}) disagrees with eager "
                          f"PyTorch on {type(model).__name__}: max abs diff {p['max_abs_diff']:.3g} > tolerance "
                          f"{p['tolerance']:.3g} on {p['mismatched']:.2%} of the outputs"
                          + (f" (the model is unstable: eager itself moves by {p['floor']:.3g} for a tiny change of "
                             "the input, and the runtime is off by more than twice that)" if p.get("unstable") else ""))
    return compiled


def parity(compiled: Compiled, model: nn.Module, example: torch.Tensor, rtol: float) -> dict:
    """Outputs of ``compiled`` against eager float32 ``model`` on ``example``: ``max_abs_diff``, ``tolerance``
    (``ATOL`` + ``rtol`` × the largest absolute output), ``mismatched`` (fraction beyond it), ``floor`` (how far
    eager itself moves when the input moves by ``rtol`` / 10 of its spread, at least 1e-6) and ``ok``: within
    tolerance, or ``unstable`` and within twice the floor.

    ``unstable``: eager itself moves by more than the tolerance for that change of the input (max-unpooling
    indices flipping between near-equal maxima in an untrained SegNet), so no runtime can be held closer: another
    kernel's float32 rounding (OpenVINO's on a Xeon with AMX: 0.0068 on SegNet, where eager moves by 0.025 for a
    1e-5 change and 4e-7 for 1e-6) flips indices too. Such a deployment is timed and marked ``unstable``, never
    silently, and one off by more than twice the floor still fails: instability excuses what such a change of
    the input does, not any output."""
    wrapper = Outputs(model)
    with eval_mode(wrapper), torch.inference_mode():
        cpu = example.detach().cpu().float()
        expected = [t.detach().double().cpu().numpy() for t in output_tensors(wrapper(example))]
    got = compiled.outputs(compiled.prepare(cpu if compiled.device == "cpu" else example))
    if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
        return dict(max_abs_diff=float("inf"), tolerance=ATOL, mismatched=1.0, floor=0.0, ok=False)
    scale = max(float(np.max(np.abs(e))) if e.size else 0.0 for e in expected)
    tolerance = ATOL + rtol * scale
    diffs = [np.abs(g - e) for g, e in zip(got, expected)]
    largest = max(float(d.max()) if d.size else 0.0 for d in diffs)
    mismatched = sum(int(np.sum(d > tolerance)) for d in diffs) / max(sum(d.size for d in diffs), 1)
    floor = sensitivity(wrapper, example, rel=max(1e-6, rtol / 10)) if largest > tolerance else 0.0
    unstable = largest > tolerance and floor > tolerance
    return dict(max_abs_diff=largest, tolerance=tolerance, mismatched=mismatched, floor=floor,
                ok=largest <= tolerance or (unstable and largest <= 2 * floor), unstable=unstable)
