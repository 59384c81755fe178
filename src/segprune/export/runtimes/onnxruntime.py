"""onnxruntime: an ONNX file on the CPU execution provider, or on CUDA's where onnxruntime-gpu provides it.

Sessions run sequentially with ``threads`` intra-op threads and one inter-op thread, as a deployment on a fixed
core budget would. ``profile`` uses onnxruntime's own profiler (a JSON trace of every node's kernel time).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections import defaultdict

import numpy as np
import torch

from segprune.export.runtimes.base import Compiled, OpTime, Runtime, RuntimeUnavailable, register_runtime

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def ort_session(path, threads: int | None = None, *, device: str = "cpu", profile: bool = False):
    """An onnxruntime session with ``threads`` intra-op threads (torch's setting when None), run sequentially."""
    ONNXRUNTIME.require()
    import onnxruntime as ort  # optional (segprune[onnx]): imported only when this runtime is used

    provider = _PROVIDERS[device]
    if provider not in ort.get_available_providers():
        raise RuntimeUnavailable(f"onnxruntime here has no {provider} (install onnxruntime-gpu for cuda)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="segprune-ort-"), "profile")
    return ort.InferenceSession(str(path), options, providers=[provider])


class OrtModel(Compiled):
    runtime = "onnxruntime"

    def __init__(self, session, *, path=None, device: str = "cpu", threads: int | None = None):
        self.session, self.path, self.device = session, path, device
        self.input_name = session.get_inputs()[0].name
        self.threads = int(session.get_session_options().intra_op_num_threads) if threads is None else threads

    def prepare(self, x: torch.Tensor):
        return {self.input_name: x.detach().cpu().float().numpy()}

    def run(self, feed):
        return self.session.run(None, feed)

    def outputs(self, feed) -> list[np.ndarray]:
        return [np.asarray(o, dtype=np.float64) for o in self.run(feed)]

    def profile(self, feed, runs: int = 3) -> list[OpTime] | None:
        if self.path is None:
            return None
        session = ort_session(self.path, self.threads, device=self.device, profile=True)
        session.run(None, feed)  # warm-up, dropped below: its first-run allocations are not the model's cost
        for _ in range(runs):
            session.run(None, feed)
        trace = session.end_profiling()
        with open(trace) as f:
            events = [e for e in json.load(f) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
        per_run = defaultdict(list)
        for e in events:
            per_run[(e["name"].removesuffix("_kernel_time"), e["args"].get("op_name", "?"))].append(e["dur"] / 1e3)
        times = [OpTime(name, op, statistics.median(t[-runs:])) for (name, op), t in per_run.items()]
        return sorted(times, key=lambda t: -t.ms)


class OnnxRuntime(Runtime):
    def compile(self, source, example, *, device="cpu", precision=None, threads=1) -> OrtModel:
        self.check_precision(precision)
        self.require(device)
        if hasattr(source, "get_inputs"):  # a session made elsewhere keeps its own settings
            return OrtModel(source)
        return OrtModel(ort_session(source, threads, device=device), path=source, device=device, threads=threads)


ONNXRUNTIME = register_runtime(OnnxRuntime("onnxruntime", module="onnxruntime", extra="onnx", devices=("cpu", "cuda")))
