"""TensorRT on an NVIDIA GPU: an ONNX file built into an engine (fp32, or fp16 with the FP16 builder flag) and run
on CUDA tensors that torch allocates, on torch's current stream.

Needs a GPU and the ``tensorrt`` package (``segprune[tensorrt]``); without either, ``compile`` raises
:class:`RuntimeUnavailable` with the reason, so a benchmark that asks for it says why it has no row.
"""

from __future__ import annotations

import numpy as np
import torch

from segprune.export.runtimes.base import Compiled, Runtime, register_runtime


class TensorRtModel(Compiled):
    runtime = "tensorrt"
    device = "cuda"

    def __init__(self, engine, *, precision: str):
        self.engine, self.precision, self.inference_precision = engine, precision, precision
        self.context = engine.create_execution_context()
        self.names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]

    def prepare(self, x: torch.Tensor):
        import tensorrt as trt  # optional (segprune[tensorrt])

        buffers = {}
        for name in self.names:
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                buffers[name] = x.detach().to("cuda", torch.float32).contiguous()
            else:
                shape = tuple(self.context.get_tensor_shape(name))
                buffers[name] = torch.empty(shape, device="cuda", dtype=torch.float32)
            self.context.set_tensor_address(name, buffers[name].data_ptr())
        return buffers

    def run(self, feed):
        stream = torch.cuda.current_stream()
        self.context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return feed

    def outputs(self, feed) -> list[np.ndarray]:
        import tensorrt as trt

        self.run(feed)
        return [feed[n].double().cpu().numpy() for n in self.names
                if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]


class TensorRt(Runtime):
    def compile(self, source, example, *, device="cuda", precision=None, threads=None) -> TensorRtModel:
        precision = self.check_precision(precision)
        self.require(device)
        import tensorrt as trt

        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        with open(source, "rb") as f:
            if not parser.parse(f.read()):
                errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise ValueError(f"TensorRT cannot parse {source}: {errors}")
        config = builder.create_builder_config()
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ValueError(f"TensorRT could not build an engine from {source} (see its log above)")
        engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
        return TensorRtModel(engine, precision=precision)


TENSORRT = register_runtime(TensorRt("tensorrt", module="tensorrt", extra="tensorrt", devices=("cuda",),
                                     precisions=("fp32", "fp16"), tolerance={"fp32": 1e-3, "fp16": 5e-2}))
