"""The runtime interface and its registry: every place that runs or times a model asks here.

A :class:`Runtime` says what it needs (the Python module and the pip extra that installs it), where it runs
(devices), at which precisions (the first is its default), what it compiles (an ``nn.Module`` or an ONNX file),
and how close to eager PyTorch its output must be at each precision before a timing of it is trusted. Compiling
gives a :class:`Compiled` model that prepares inputs, runs, returns its outputs as NumPy arrays and, where the
runtime can, profiles itself op by op.

Adding a runtime is one file: subclass :class:`Runtime`, implement ``compile`` and call :func:`register_runtime`.
A name may carry a precision, ``"openvino:fp32"``; :func:`parse` splits it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
from dataclasses import dataclass, field

import numpy as np
import torch

_REGISTRY: dict[str, Runtime] = {}


class RuntimeUnavailable(ImportError):
    """The runtime's package is not installed, or it cannot run on the device asked for; the message says what to
    install or which device it needs."""


@dataclass(frozen=True)
class OpTime:
    """One op of a profiled run: its node name, op type and milliseconds."""

    name: str
    op: str
    ms: float


class Compiled:
    """A model compiled by a runtime. Subclasses set ``runtime``, ``device``, ``precision`` (as asked),
    ``inference_precision`` (what the runtime resolved it to) and ``threads``, and implement ``prepare``, ``run``
    and ``outputs``; ``profile`` where the runtime can time its ops."""

    runtime: str
    device: str = "cpu"
    precision: str = "fp32"
    inference_precision: str = "fp32"
    threads: int | None = None

    def active(self) -> contextlib.AbstractContextManager:
        """What must hold while the model runs (eval mode and inference mode for eager PyTorch)."""
        return contextlib.nullcontext()

    def prepare(self, x: torch.Tensor):
        """The runtime's own form of the input, made once before any clock starts."""
        raise NotImplementedError

    def run(self, feed):
        """One forward pass, finished when this returns (a GPU runtime synchronises)."""
        raise NotImplementedError

    def outputs(self, feed) -> list[np.ndarray]:
        """The outputs of one pass, as float64 NumPy arrays (for parity checks)."""
        raise NotImplementedError

    def profile(self, feed, runs: int = 3) -> list[OpTime] | None:
        """Per-op times of a run (the median over ``runs``), slowest first; None when the runtime cannot tell."""
        return None

    def __call__(self, feed):
        return self.run(feed)

    def describe(self) -> dict:
        """The conditions a timing of this model was taken under."""
        return dict(backend=self.runtime, device=self.device, precision=self.precision,
                    inference_precision=self.inference_precision, threads=self.threads)


@dataclass(frozen=True)
class Runtime:
    """A deployment runtime (see the module docstring). ``tolerance``: per precision, the largest difference from
    eager PyTorch accepted, relative to the largest absolute output value."""

    name: str
    module: str | None = None  # the Python module it needs (None: torch alone)
    extra: str | None = None  # the segprune extra that installs it
    devices: tuple[str, ...] = ("cpu",)
    precisions: tuple[str, ...] = ("fp32",)
    source: str = "onnx"  # what `compile` takes: "module" (an nn.Module) or "onnx" (a file path)
    tolerance: dict[str, float] = field(default_factory=lambda: {"fp32": 1e-4})

    def missing(self, device: str = "cpu") -> str | None:
        """Why this runtime cannot run here on ``device`` (one line naming what to install), or None."""
        if device not in self.devices:
            return f"runtime {self.name!r} runs on {', '.join(self.devices)}, not {device}"
        if self.module is not None and importlib.util.find_spec(self.module) is None:
            return f"runtime {self.name!r} needs {self.module}: pip install 'segprune[{self.extra}]'"
        if device == "cuda" and not torch.cuda.is_available():
            return f"runtime {self.name!r} on cuda needs a GPU, and torch sees none"
        return None

    def require(self, device: str = "cpu") -> None:
        why = self.missing(device)
        if why is not None:
            raise RuntimeUnavailable(why)

    def check_precision(self, precision: str | None) -> str:
        precision = precision or self.precisions[0]
        if precision not in self.precisions:
            raise ValueError(f"runtime {self.name!r} has precisions {', '.join(self.precisions)}, not {precision!r}")
        return precision

    def compile(self, source, example: torch.Tensor, *, device: str = "cpu", precision: str | None = None,
                threads: int | None = 1) -> Compiled:
        """A :class:`Compiled` model of ``source`` (an ``nn.Module`` or an ONNX path, as ``self.source`` says)
        for inputs shaped like ``example``."""
        raise NotImplementedError


def register_runtime(runtime: Runtime) -> Runtime:
    """Add ``runtime`` to the registry under its name (a name already taken is refused)."""
    if runtime.name in _REGISTRY:
        raise ValueError(f"a runtime named {runtime.name!r} is already registered")
    if ":" in runtime.name:
        raise ValueError(f"a runtime's name cannot hold ':' (it separates the precision): {runtime.name!r}")
    _REGISTRY[runtime.name] = runtime
    return runtime


def runtime_names() -> tuple[str, ...]:
    """Every registered runtime, installed or not, in registration order."""
    return tuple(_REGISTRY)


def get_runtime(name: str) -> Runtime:
    """The registered runtime ``name`` (a precision suffix, ``"openvino:fp32"``, is ignored here)."""
    base = name.split(":", 1)[0]
    if base not in _REGISTRY:
        raise ValueError(f"unknown runtime {base!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[base]


def parse(spec: str) -> tuple[Runtime, str]:
    """``"name"`` or ``"name:precision"`` → (runtime, precision), the runtime's default precision for a bare name;
    an unknown name or precision raises ValueError naming the choices."""
    runtime = get_runtime(spec)
    precision = spec.split(":", 1)[1] if ":" in spec else None
    return runtime, runtime.check_precision(precision)


def spec_type(spec: str) -> str:
    """An argparse ``type`` for runtime specs: the spec itself when it parses (choices come from the registry)."""
    try:
        parse(spec)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return spec
