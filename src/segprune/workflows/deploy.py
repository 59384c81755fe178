"""`segprune export`: a checkpoint folder to ONNX (checked with onnxruntime) and / or TorchScript.

Both output files are claimed before the model is loaded, so a refused path costs nothing. The example input is
the size the checkpoint's recipe trained at unless one is given.
"""

from __future__ import annotations

from pathlib import Path

from segprune import checkpoint
from segprune.export import export_onnx, export_torchscript, fuse_conv_bn
from segprune.workflows import rundir
from segprune.workflows.bench import check_takes, example_input


def export_checkpoint(folder: str | Path, *, onnx: str | Path | None = None, torchscript: str | Path | None = None,
                      fuse: bool = False, input_size: tuple[int, int] | None = None, batch: int = 1,
                      opset: int = 17, dynamic: bool = True, atol: float = 1e-4, rtol: float = 0.0,
                      force: bool = False) -> dict[str, dict]:
    """Export the model in checkpoint ``folder`` to ``onnx`` and / or ``torchscript`` (files).

    Args:
        fuse: Fold Conv+BN into the convs first.
        input_size: (H, W) of the example input for the export and the parity check; default
            :func:`trained_size`.
        opset, dynamic, atol, rtol: As :func:`segprune.export.export_onnx` (``atol``/``rtol`` for ONNX only).
        force: Write over existing files.

    Returns:
        {"onnx": export_onnx's result, "torchscript": export_torchscript's}, for the formats asked for.

    Raises:
        ValueError: neither format asked for, a model that cannot take the input, or a missing exporter.
        FileExistsError: an output exists and ``force`` is not set (see :func:`segprune.workflows.rundir.claim`).
    """
    outs = {"--onnx": onnx, "--torchscript": torchscript}
    if not any(outs.values()):
        raise ValueError("export needs --onnx OUT.onnx and/or --torchscript OUT.pt")
    for option, out in outs.items():
        if out:
            rundir.claim_file(out, force=force, option=option)
    model = checkpoint.load(folder)
    x = example_input(folder, tuple(input_size or trained_size(folder)), batch)
    check_takes(folder, model, x)
    if fuse:
        model = fuse_conv_bn(model, x)
    results = {}
    try:
        if onnx:
            results["onnx"] = export_onnx(model, x, onnx, opset=opset, dynamic=dynamic, atol=atol, rtol=rtol)
        if torchscript:
            results["torchscript"] = export_torchscript(model, x, torchscript)
    except ImportError as err:
        raise ValueError(str(err)) from err
    return results


def trained_size(folder: str | Path) -> tuple[int, int]:
    """The input size a checkpoint's recipe trained at (``config.json``), else 512×512."""
    size = checkpoint.load_config(folder).get("recipe", {}).get("size")
    return tuple(size) if isinstance(size, list) and len(size) == 2 else (512, 512)
