"""Deployment: Conv+BN folding, ONNX (with an onnxruntime parity check), TorchScript and ``torch.export``."""

from segprune.export.fuse import fusable_pairs, fuse_conv_bn
from segprune.export.onnx import ExportError, export_onnx, export_program, export_torchscript

__all__ = ["ExportError", "export_onnx", "export_program", "export_torchscript", "fusable_pairs", "fuse_conv_bn"]
