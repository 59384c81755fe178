"""Eager PyTorch on CPU or CUDA: the model itself, in eval mode under ``torch.inference_mode()``; float16 on CUDA."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch

from segprune._utils import eval_mode, tensors
from segprune.export.runtimes.base import Compiled, Runtime, register_runtime

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class EagerModel(Compiled):
    runtime = "eager"

    def __init__(self, model: torch.nn.Module, *, device: str, precision: str, threads: int | None):
        self.model, self.device, self.precision, self.inference_precision = model, device, precision, precision
        self.dtype, self.threads = _DTYPES[precision], threads

    def active(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(eval_mode(self.model))
        stack.enter_context(torch.inference_mode())
        return stack

    def prepare(self, x: torch.Tensor):
        return x.to(self.device, self.dtype)

    def run(self, feed):
        out = self.model(feed)
        if feed.is_cuda:
            torch.cuda.synchronize(feed.device)
        return out

    def outputs(self, feed) -> list[np.ndarray]:
        with self.active():
            out = self.model(feed)
        out = out["out"] if isinstance(out, dict) and "out" in out else out
        return [t.detach().double().cpu().numpy() for t in tensors(out)]

    def describe(self) -> dict:
        return {**super().describe(), "threads": torch.get_num_threads() if self.device == "cpu" else None}


class Eager(Runtime):
    def compile(self, source, example, *, device="cpu", precision=None, threads=1) -> EagerModel:
        precision = self.check_precision(precision)
        self.require(device)
        if precision == "fp16" and device == "cpu":
            raise ValueError("eager fp16 runs on cuda only (CPU float16 kernels are slower than float32)")
        on_device = all(t.device.type == device for t in [*source.parameters(), *source.buffers()])
        model = source if on_device and precision == "fp32" else copy.deepcopy(source).to(device, _DTYPES[precision])
        return EagerModel(model, device=device, precision=precision, threads=threads)


EAGER = register_runtime(Eager("eager", devices=("cpu", "cuda"), precisions=("fp32", "fp16"), source="module",
                               tolerance={"fp32": 0.0, "fp16": 0.0}))
