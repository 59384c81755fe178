"""Deployment runtimes, one registry: eager PyTorch, onnxruntime, OpenVINO, TensorRT (see ``base``).

Importing this package registers the built-in runtimes; a runtime of one's own is one file that subclasses
:class:`Runtime` and calls :func:`register_runtime`.
"""

from segprune.export.runtimes.base import (
    Compiled,
    OpTime,
    Runtime,
    RuntimeUnavailable,
    get_runtime,
    parse,
    register_runtime,
    runtime_names,
    spec_type,
)

# isort: off  (registration order is the order runtimes are listed in: eager first, the GPU-only one last)
from segprune.export.runtimes.eager import EAGER
from segprune.export.runtimes.onnxruntime import ONNXRUNTIME, ort_session
from segprune.export.runtimes.openvino import OPENVINO
from segprune.export.runtimes.tensorrt import TENSORRT

# isort: on

__all__ = ["EAGER", "ONNXRUNTIME", "OPENVINO", "TENSORRT", "Compiled", "OpTime", "Runtime", "RuntimeUnavailable",
           "get_runtime", "ort_session", "parse", "register_runtime", "runtime_names", "spec_type"]
