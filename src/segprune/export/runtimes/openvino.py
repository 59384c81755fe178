"""OpenVINO on the CPU: an ONNX file compiled by the CPU plugin for latency (one stream, ``threads`` threads).

Precisions: ``fp32`` sets the inference precision hint to f32; ``default`` leaves the plugin's own choice, which is
bf16 on CPUs with AVX-512 BF16 or AMX and f32 elsewhere. What it resolved to is read back from the compiled model
and stated as ``inference_precision`` in every result. ``profile`` uses the plugin's performance counters.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

import numpy as np
import torch

from segprune.export.runtimes.base import Compiled, OpTime, Runtime, register_runtime


class OpenVinoModel(Compiled):
    runtime = "openvino"

    def __init__(self, compiled, *, precision: str, threads: int, profiling: bool):
        self.compiled, self.precision, self.threads, self.profiling = compiled, precision, threads, profiling
        self.request = compiled.create_infer_request()
        self.inference_precision = _precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))

    def prepare(self, x: torch.Tensor):
        return {0: np.ascontiguousarray(x.detach().cpu().float().numpy())}

    def run(self, feed):
        return self.request.infer(feed)

    def outputs(self, feed) -> list[np.ndarray]:
        result = self.request.infer(feed)
        return [np.asarray(result[out], dtype=np.float64) for out in self.compiled.outputs]

    def profile(self, feed, runs: int = 3) -> list[OpTime] | None:
        if not self.profiling:
            return None
        per_op = defaultdict(list)
        for _ in range(runs):
            self.request.infer(feed)
            for p in self.request.get_profiling_info():
                per_op[(p.node_name, f"{p.node_type} ({p.exec_type})")].append(p.real_time.total_seconds() * 1e3)
        return sorted((OpTime(n, op, statistics.median(t)) for (n, op), t in per_op.items()), key=lambda t: -t.ms)


class OpenVino(Runtime):
    def compile(self, source, example, *, device="cpu", precision=None, threads=1, profiling: bool = True
                ) -> OpenVinoModel:
        precision = self.check_precision(precision)
        self.require(device)
        import openvino as ov  # optional (segprune[openvino]): imported only when this runtime is used

        config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "PERF_COUNT": profiling}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if precision == "fp32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        compiled = ov.Core().compile_model(str(source), "CPU", config)
        return OpenVinoModel(compiled, precision=precision, threads=threads, profiling=profiling)


def _precision_name(element_type) -> str:
    """OpenVINO's element type (``<Type: 'bfloat16'>``) as segprune names precisions (``bf16``)."""
    text = str(getattr(element_type, "get_type_name", lambda: element_type)()).lower()
    return {"f32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "f16": "fp16",
            "float16": "fp16"}.get(text, text)


# bf16 keeps 8 bits of mantissa: its outputs differ from float32 by about 1 % of their scale
OPENVINO = register_runtime(OpenVino("openvino", module="openvino", extra="openvino", precisions=("default", "fp32"),
                                     tolerance={"fp32": 1e-4, "default": 5e-2}))
