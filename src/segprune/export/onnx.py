"""ONNX export with an onnxruntime parity check, and TorchScript / ``torch.export`` for PyTorch runtimes.

What is exported is the model's eval-mode output: the ``"out"`` logits of a semantic model, or the outputs a model
names in ``export_outputs`` (YOLACT: ``cls``, ``box``, ``coef``, ``proto``, the raw head outputs before anchors,
Fast NMS and mask assembly, which stay in Python: ``segprune.models.yolact.postprocess`` takes them from
onnxruntime as from PyTorch). Auxiliary heads and dropout run in training mode only, so they never reach the graph
(the wrapper :class:`Outputs` returns nothing else). Every output is checked; the tolerance's relative part is
taken per output.

Two exporters, tried in this order by ``exporter="auto"``:

- TorchScript (``torch.onnx.export(dynamo=False)``): fast (well under a second for a tiny model) and good with
  dynamic axes; deprecated by PyTorch but present in 2.13. It cannot export ``max_unpool2d`` (SegNet) nor
  adaptive pooling whose output size does not divide its input.
- dynamo (``dynamo=True``, needs onnxscript): exports those too, at 3-20 s per tiny model (about 2.5 min for
  PSPNet-ResNet50 at 512² on a busy 2-core machine), at opset 18 or later (a request for 17 gets 18).

Dynamic axes: batch, H and W are dynamic where the model allows. Adaptive pooling to a size other than 1
bakes the input size into the graph (the TorchScript exporter refuses it; the dynamo exporter produces a graph
that is wrong at any other size), so a model with such a layer gets static H and W, and a note says which layer.
An export that fails only with dynamic axes is retried with fewer (noted); an op with no translation at all is an
:class:`ExportError` naming it at once.

With ``check=True`` the file is run by onnxruntime on the example input and, when some axis is dynamic, on a
second input of another batch and size; a dynamic export that fails the second check is redone with fewer
dynamic axes (noted), and a mismatch on the example input itself is an error that says on what fraction of the
outputs, and how much eager PyTorch itself moves for a 1e-6 change of the input: a model whose max-unpooling
indices flip between near-equal maxima (SegNet at full size, untrained) cannot agree to 1e-4 with any runtime.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segprune._utils import eval_mode
from segprune.export.outputs import Outputs, output_tensors
from segprune.export.pooling import export_form
from segprune.export.runtimes import ONNXRUNTIME

EXPORTERS = ("auto", "torchscript", "dynamo")
_AXES = {0: "batch", 2: "height", 3: "width"}


class ExportError(ValueError):
    """The model could not be exported, or the exported file does not compute what the model computes.

    ``ops`` lists the ops that no exporter has a translation for at all (empty when the failure was another one,
    e.g. an op that cannot take dynamic shapes).
    """

    def __init__(self, message: str, ops: list[str] | None = None):
        super().__init__(message)
        self.ops = list(ops or [])


def _tmp_path(path: Path) -> Path:
    """Where ``path`` is written before the rename; keeps the suffix, which ``torch.export.load`` insists on."""
    return path.with_name(f"{path.stem}.tmp{path.suffix}")


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as err:
        raise ImportError(f"ONNX export needs {module}: pip install 'segprune[onnx]'") from err


# --- which axes may be dynamic ------------------------------------------------------------------------------------
def fixed_size_layers(model: nn.Module) -> list[str]:
    """Adaptive pooling layers whose output size is not 1: they tie the graph to the input size."""
    pools = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
    pools += (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
    out = []
    for name, module in model.named_modules():
        size = getattr(module, "output_size", None)
        sizes = size if isinstance(size, (tuple, list)) else (size,)
        if isinstance(module, pools) and any(s not in (1, None) for s in sizes):
            out.append(f"{name} ({type(module).__name__} to {size})")
    return out


def _axis_candidates(model: nn.Module, dynamic: bool, notes: list[str]) -> list[dict]:
    """Dynamic-axis sets to try, most dynamic first; the last is always static."""
    if not dynamic:
        return [{}]
    fixed = fixed_size_layers(model)
    if fixed:
        more = f" (and {len(fixed) - 1} more)" if len(fixed) > 1 else ""
        notes.append(f"static H and W: {fixed[0]}{more} fixes the input size in ONNX")
        return [{0: "batch"}, {}]
    return [dict(_AXES), {0: "batch"}, {}]


# --- the two exporters --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    """Silence the exporters for the block: deprecation warnings and progress logs; and, at the file-descriptor
    level, the TorchScript exporter's C++ dump of its whole graph to stdout when it fails (torch 2.13's
    ``setup_onnx_logging`` tests the function ``_jit_is_onnx_log_enabled`` instead of calling it, so that log is
    always on). The failure itself is re-raised as an ExportError."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with _stdout_fd_silenced(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def _stdout_fd_silenced():
    """File descriptor 1 goes to /dev/null for the block (what C++ code prints), then comes back."""
    fd = 1  # C++ writes to the process's descriptor 1, whatever sys.stdout is
    try:
        saved = os.dup(fd)
    except OSError:  # no descriptor 1: nothing to silence
        yield
        return
    for stream in (sys.stdout, sys.__stdout__):
        if stream is not None:
            stream.flush()
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _export_torchscript(wrapper: nn.Module, x: torch.Tensor, path: Path, opset: int, axes: dict) -> None:
    # "out" has the input's axes; other outputs (YOLACT's anchors) are declared by batch, the rest inferred
    out_axes = {name: axes if name == "out" else {a: n for a, n in axes.items() if a == 0} for name in wrapper.names}
    dynamic_axes = {"input": axes, **out_axes} if axes else None
    torch.onnx.export(wrapper, (x,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
                      output_names=list(wrapper.names), dynamic_axes=dynamic_axes, do_constant_folding=True)


def _export_dynamo(wrapper: nn.Module, x: torch.Tensor, path: Path, opset: int, axes: dict) -> None:
    _require("onnxscript")
    shapes = ({a: torch.export.Dim.DYNAMIC for a in axes},) if axes else None
    torch.onnx.export(wrapper, (x,), str(path), dynamo=True, opset_version=max(opset, 18), input_names=["input"],
                      output_names=list(wrapper.names), dynamic_shapes=shapes, external_data=False, verbose=False,
                      report=False)


_EXPORT = {"torchscript": _export_torchscript, "dynamo": _export_dynamo}
_OP_PATTERNS = [r"operator '([\w:.]+)'", r"unrecognized namespace ([\w:.]+)", r"ONNX export of operator ([\w:.]+)",
                r"OpOverload\(op='([\w.]+)'", r"target=torch\.ops\.([\w.]+)"]


# Messages saying an op has no translation at all (as opposed to none for these shapes or arguments).
_MISSING_PATTERNS = [r"Exporting the operator '([\w:.]+)' to ONNX opset version \d+ is not supported",
                     r"unrecognized namespace ([\w:.]+)", r"No ONNX function found for <OpOverload\(op='([\w.]+)'"]


def _op_name(raw: str) -> str:
    """One spelling for an op whichever exporter named it: ``namespace::name`` (``.default`` overload dropped)."""
    name = re.sub(r"\.default$", "", raw.rstrip("."))
    return name if "::" in name else name.replace(".", "::", 1)


def unsupported_ops(err: BaseException, patterns: list[str] = _OP_PATTERNS) -> list[str]:
    """Op names an exporter's error message (or its causes) names as impossible to export."""
    found, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        for pattern in patterns:
            found += [m for m in map(_op_name, re.findall(pattern, str(err))) if m not in found]
        err = err.__cause__ or err.__context__
    return found


def _first_line(err: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()  # without terminal colour codes
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def _export_any(wrapper: nn.Module, x: torch.Tensor, path: Path, opset: int, axes: dict, exporter: str) -> str:
    """Export with the first exporter that succeeds; returns its name, or raises ExportError naming the ops."""
    names = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    failures = {}
    for name in names:
        try:
            with _quiet(), torch.no_grad():
                _EXPORT[name](wrapper, x, path, opset, axes)
            return name
        except ImportError:
            raise
        except Exception as err:  # noqa: BLE001  (every exporter failure is reported together below)
            failures[name] = err
    ops = list(dict.fromkeys(op for err in failures.values() for op in unsupported_ops(err)))
    what = f"op {', '.join(ops)} has no ONNX equivalent" if ops else "export failed"
    detail = "; ".join(f"{n} exporter: {_first_line(e)}" for n, e in failures.items())
    missing = list(dict.fromkeys(op for err in failures.values() for op in unsupported_ops(err, _MISSING_PATTERNS)))
    raise ExportError(f"cannot export {type(wrapper.model).__name__} to ONNX: {what} ({detail})", missing)


# --- parity ---------------------------------------------------------------------------------------------------------
def _compare(compiled, wrapper: nn.Module, x: torch.Tensor, atol: float, rtol: float) -> dict:
    """Parity of onnxruntime with eager PyTorch on ``x``: ``shape``, ``max_abs_diff``, ``tolerance`` (``atol`` plus
    ``rtol`` times the largest absolute value, of the worst output), ``mismatched`` (fraction of values beyond it)
    and ``ok`` (every output within its own tolerance)."""
    with torch.no_grad():
        expected = [t.detach().float().cpu().numpy().astype(np.float64) for t in output_tensors(wrapper(x))]
    got = compiled.outputs(compiled.prepare(x))
    row = dict(shape=list(x.shape))
    if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
        return {**row, "max_abs_diff": float("inf"), "tolerance": atol, "mismatched": 1.0, "ok": False}
    worst = dict(max_abs_diff=0.0, tolerance=atol, ratio=-1.0)
    beyond, total = 0, 0
    for g, e in zip(got, expected):
        diff = np.abs(g - e)
        tolerance = atol + rtol * (float(np.max(np.abs(e))) if e.size else 0.0)
        largest = float(diff.max()) if diff.size else 0.0
        beyond, total = beyond + int(np.sum(diff > tolerance)), total + diff.size
        if largest / tolerance > worst["ratio"]:
            worst = dict(max_abs_diff=largest, tolerance=tolerance, ratio=largest / tolerance)
    return {**row, "max_abs_diff": worst["max_abs_diff"], "tolerance": worst["tolerance"],
            "mismatched": beyond / max(total, 1), "ok": beyond == 0}


def sensitivity(wrapper: nn.Module, x: torch.Tensor, rel: float = 1e-6) -> float:
    """How much eager PyTorch's own output moves when ``x`` moves by ``rel`` of its spread: the floor under any
    runtime's agreement (large where max-unpooling indices flip between near-equal maxima)."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x) * rel * float(x.float().std())
    with torch.no_grad():
        return _max_diff(wrapper(x + noise), wrapper(x))


def _max_diff(a, b) -> float:
    """Largest absolute difference between two outputs of :class:`Outputs` (over all their tensors)."""
    return max(float((s - t).abs().max()) if s.numel() else 0.0 for s, t in zip(output_tensors(a), output_tensors(b)))


def _second_input(model: nn.Module, x: torch.Tensor, axes: dict) -> torch.Tensor | None:
    """An input differing from ``x`` on every dynamic axis (H and W grown by multiples of the model's divisor)."""
    if not axes:
        return None
    shape = list(x.shape)
    step = max(int(getattr(model, "needs_divisible_input", 1)), 8)
    for axis in axes:
        shape[axis] += 1 if axis == 0 else step * (1 if axis == 2 else 2)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(x)


def _check(path: Path, wrapper: nn.Module, x: torch.Tensor, axes: dict, atol: float, rtol: float) -> list[dict]:
    """Parity rows (see :func:`_compare`) on ``x`` and, for a dynamic export, a second input; a
    second input that the model or onnxruntime refuses gives a row with ``error`` instead."""
    session, rows = ONNXRUNTIME.compile(path, x, threads=None), []
    for i, inp in enumerate([x, _second_input(wrapper.model, x, axes)]):
        if inp is None:
            break
        try:
            rows.append(_compare(session, wrapper, inp, atol, rtol))
        except Exception as err:  # noqa: BLE001  (only the second input may fail: the model ran on x already)
            if i == 0:
                raise
            rows.append(dict(shape=list(inp.shape), error=_first_line(err), ok=False))
    return rows


# --- the public functions -----------------------------------------------------------------------------------------
def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path, *, opset: int = 17,
                dynamic: bool = True, check: bool = True, atol: float = 1e-4, rtol: float = 0.0,
                exporter: str = "auto", pool_indices: str = "argmax") -> dict:
    """Export ``model``'s eval-mode outputs (see :class:`Outputs`) to ONNX, then check the file against the model.

    Args:
        model: The model (its training/eval modes are restored afterwards).
        example_input: Input batch (N, C, H, W) on the model's device; also the first parity input.
        path: Where the ``.onnx`` file goes; written to a temporary name and renamed into place.
        opset: ONNX opset (17 or later; the dynamo exporter uses at least 18).
        dynamic: Make batch, H and W dynamic where the model allows (see the module docstring).
        check: Run onnxruntime on ``example_input`` (and on a second size when an axis is dynamic).
        atol: Largest absolute difference accepted (plus ``rtol`` times the largest absolute logit).
        rtol: Relative part of the tolerance: float32 rounding grows with the logits' scale, so an untrained model
            with logits in the hundreds needs it; 0 makes the check purely absolute.
        exporter: ``"auto"`` (TorchScript, then dynamo), ``"torchscript"`` or ``"dynamo"``.
        pool_indices: ``"argmax"``: max pooling with indices over non-overlapping windows is exported as
            ``MaxPool`` + ``ArgMax`` (:mod:`segprune.export.pooling`: OpenVINO runs ONNX's MaxPool-with-indices in
            a reference kernel, 2.8x slower for SegNet), and adaptive average pooling to several bins as two
            matrix products (:class:`~segprune.export.pooling.MatrixAdaptiveAvgPool`); ``"native"``: both as the
            exporter emits them.

    Returns:
        ``path``, ``opset`` (of the file), ``exporter``, ``dynamic_axes`` ({axis: name}), ``max_abs_diff``
        (over the checked inputs; None when ``check`` is False), ``checked_shapes``, ``file_bytes``, ``nodes``
        and ``notes``.

    Raises:
        ExportError: an op cannot be exported (named), or onnxruntime disagrees with the model on the example input.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if opset < 17:
        raise ValueError(f"opset must be 17 or later, got {opset}")
    onnx = _require("onnx")
    if pool_indices not in ("argmax", "native"):
        raise ValueError(f"pool_indices must be 'argmax' or 'native', got {pool_indices!r}")
    path, notes = Path(path), []
    tmp = _tmp_path(path)
    wrapper = Outputs(model)
    form, swapped = export_form(model) if pool_indices == "argmax" else (model, [])
    exported = Outputs(form) if swapped else wrapper
    if swapped:
        notes.append(f"pooling exported in its fast form (MaxPool + ArgMax for indices, averaging matrices for "
                     f"adaptive bins; export/pooling.py): {', '.join(swapped)}")
    # the wrappers too: the TorchScript exporter restores the wrapper's mode recursively
    with eval_mode(wrapper), eval_mode(exported):
        try:
            candidates = _axis_candidates(model, dynamic, notes)
            result = _export_checked(wrapper, example_input, tmp, opset=opset, check=check, atol=atol, rtol=rtol,
                                     exporter=exporter, candidates=candidates, notes=notes, exported=exported)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    graph = onnx.load(str(tmp), load_external_data=False)
    os.replace(tmp, path)
    opset_used = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), opset)
    return dict(path=str(path), opset=opset_used, file_bytes=path.stat().st_size, nodes=len(graph.graph.node),
                notes=notes, **result)


def _export_checked(wrapper, x, tmp: Path, *, opset, check, atol, rtol, exporter, candidates, notes,
                    exported) -> dict:
    """Export ``exported`` (``wrapper``'s model in its export form) with the first axis set in ``candidates`` whose
    file passes the parity checks against ``wrapper`` (the last set is static)."""
    for axes in candidates:
        try:
            used = _export_any(exported, x, tmp, opset, axes, exporter)
        except ExportError as err:
            if not axes or err.ops:  # static failed too, or an op that no input shape will make exportable
                raise
            notes.append(f"dynamic {'/'.join(axes.values())} dropped: {err}")
            continue
        result = dict(exporter=used, dynamic_axes=axes, max_abs_diff=None, checked_shapes=[])
        if not check:
            return result
        rows = _check(tmp, wrapper, x, axes, atol, rtol)
        if not axes and not rows[0]["ok"]:  # static: the example input decides
            raise _parity_error(wrapper, x, rows[0], used)
        if all(row["ok"] for row in rows):
            return {**result, "max_abs_diff": max(row["max_abs_diff"] for row in rows),
                    "checked_shapes": [row["shape"] for row in rows]}
        bad = next(row for row in rows if not row["ok"])
        why = bad.get("error") or f"max abs diff {bad['max_abs_diff']:.3g}"
        notes.append(f"dynamic {'/'.join(axes.values())} dropped: the {used} export fails at input {bad['shape']} "
                     f"({why})")
    raise AssertionError("unreachable: the last candidate is static, which returns or raises")


def _parity_error(wrapper: nn.Module, x: torch.Tensor, row: dict, exporter: str) -> ExportError:
    floor = sensitivity(wrapper, x)
    return ExportError(
        f"onnxruntime disagrees with {type(wrapper.model).__name__} on the example input {tuple(x.shape)}: max abs "
        f"diff {row['max_abs_diff']:.3g} > tolerance {row['tolerance']:.3g} on {row['mismatched']:.2%} of the "
        f"outputs ({exporter} exporter). For scale: eager PyTorch itself moves by {floor:.3g} when the input moves "
        "by 1e-6 of its spread" + (" - the model is numerically unstable here (e.g. max-unpooling indices flipping "
                                   "between near-equal maxima); check with a real input or a larger atol"
                                   if floor > row["tolerance"] / 10 else ""))


def export_torchscript(model: nn.Module, example_input: torch.Tensor, path: str | Path, *,
                       atol: float = 1e-5) -> dict:
    """Trace ``model``'s eval-mode logits with ``torch.jit.trace`` and save them; the saved file is reloaded and
    compared with the model on ``example_input``. Returns ``path``, ``max_abs_diff`` and ``file_bytes``."""
    return _save_checked(model, example_input, Path(path), atol, _trace_save, _jit_load)


def export_program(model: nn.Module, example_input: torch.Tensor, path: str | Path, *,
                   atol: float = 1e-5) -> dict:
    """``torch.export`` the eval-mode logits and save the ExportedProgram (``.pt2``); reloaded and compared with the
    model on ``example_input``. Returns ``path``, ``max_abs_diff`` and ``file_bytes``."""
    return _save_checked(model, example_input, Path(path), atol, _program_save,
                         lambda p: torch.export.load(p).module())


def _trace_save(wrapper: nn.Module, x: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(wrapper, (x,), check_trace=False), str(path))


def _jit_load(path: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load is deprecated in favour of torch.export, but still works
        return torch.jit.load(path)


def _program_save(wrapper: nn.Module, x: torch.Tensor, path: Path) -> None:
    torch.export.save(torch.export.export(wrapper, (x,)), str(path))


def _save_checked(model: nn.Module, x: torch.Tensor, path: Path, atol: float, save, load) -> dict:
    tmp = _tmp_path(path)
    wrapper = Outputs(model)
    with eval_mode(wrapper), torch.no_grad():
        try:
            save(wrapper, x, tmp)
            diff = _max_diff(load(str(tmp))(x), wrapper(x))
        except Exception as err:
            tmp.unlink(missing_ok=True)
            raise ExportError(f"cannot export {type(model).__name__} to {path.name}: {_first_line(err)}") from err
    if not diff <= atol:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"{path.name} disagrees with {type(model).__name__}: max abs diff {diff:.3g} > {atol:g}")
    os.replace(tmp, path)
    return dict(path=str(path), max_abs_diff=diff, file_bytes=path.stat().st_size)
