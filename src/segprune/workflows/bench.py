"""Compare checkpoints in one run: static cost, and latency measured interleaved (A B A B ...) so drift cancels.

`segprune bench A B ...` is a thin layer over :func:`bench`. Every checkpoint is loaded (a broken one is a
clear error naming its file), run once on the requested input size (a size the model cannot take is a clear
error naming the checkpoint and the size), folded (Conv+BN, as deployed) unless asked not to, and then all are
timed together by :func:`segprune.eval.profile.compare_latency`; with ``onnx=True`` each is also exported
(parity-checked) and its onnxruntime session joins the same interleaved rounds. Ratios are against the first.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import torch
from torch import nn

from segprune import checkpoint
from segprune.eval.profile import compare_latency, count_macs, count_params, file_bytes, peak_memory
from segprune.export.fuse import fuse_conv_bn
from segprune.export.onnx import export_onnx

RATIO_KEYS = ("params", "macs", "weights_bytes", "onnx_bytes", "latency_ms", "onnx_latency_ms")


def _labels(folders: list[Path]) -> list[str]:
    """Folder names, or whole paths where two names clash."""
    names = [f.name or str(f) for f in folders]
    return [str(f) if names.count(n) > 1 else n for f, n in zip(folders, names)]


def example_input(folder: str | Path, size: tuple[int, int], batch: int = 1) -> torch.Tensor:
    """A seeded random batch of ``size`` with the checkpoint's input channels."""
    channels = checkpoint.load_config(folder).get("model_kwargs", {}).get("in_channels", 3)
    return torch.randn(batch, channels, *size, generator=torch.Generator().manual_seed(0))


def check_takes(folder: str | Path, model: nn.Module, x: torch.Tensor) -> None:
    """Run ``model`` once on ``x``; a size it cannot take becomes a ValueError naming the checkpoint."""
    try:
        with torch.inference_mode():
            out = model.eval()(x)
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"{folder}: cannot take input size {x.shape[-2]}×{x.shape[-1]}: "
                         f"{str(err).splitlines()[0]}") from err
    names = tuple(getattr(model, "export_outputs", ("out",)))
    if isinstance(out, dict) and not set(names) <= set(out):
        raise ValueError(f"{folder}: the model returns {sorted(out)}, not {list(names)}: bench and export take "
                         "semantic segmentation models (\"out\" logits) and models naming their export_outputs")
    if names != ("out",):  # an instance model: outputs per anchor, not per pixel
        return
    logits = out["out"] if isinstance(out, dict) else out
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape[-2:]) != tuple(x.shape[-2:]):
        raise ValueError(f"{folder}: output {getattr(logits, 'shape', None)} does not match the input size "
                         f"{x.shape[-2]}×{x.shape[-1]}")


def _load(folder: Path, x: torch.Tensor, fuse: bool) -> nn.Module:
    model = checkpoint.load(folder)
    check_takes(folder, model, x)
    return fuse_conv_bn(model, x) if fuse else model


def _static(folder: Path, model: nn.Module, x: torch.Tensor) -> dict:
    return dict(path=str(folder), params=count_params(model), macs=count_macs(model, x),
                weights_bytes=file_bytes(folder / "weights.safetensors"),
                peak_memory_bytes=peak_memory(model, x)["peak_bytes"])


def _ratios(row: dict, first: dict) -> dict:
    return {k: row[k] / first[k] for k in RATIO_KEYS if row.get(k) is not None and first.get(k)}


def machine() -> dict:
    """What the timings were taken on."""
    info = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count(), torch=torch.__version__,
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def bench(folders: list[str | Path], *, input_size: tuple[int, int], batch: int = 1, rounds: int = 7,
          runs: int = 10, warmup: int = 3, threads: int = 1, fuse: bool = True, onnx: bool = False) -> dict:
    """Cost and interleaved latency of several checkpoints on one input size.

    Returns:
        ``settings``, ``machine`` and ``rows``: per checkpoint its ``name``, ``path``, ``params``, ``macs``,
        ``weights_bytes``, ``peak_memory_bytes``, ``latency`` (a compare_latency row) and ``latency_ms``; with
        ``onnx`` also ``onnx_bytes``, ``onnx_max_abs_diff``, ``onnx_latency`` and ``onnx_latency_ms``; and
        ``ratios`` of those against the first checkpoint.
    """
    folders = [Path(f) for f in folders]
    if not folders:
        raise ValueError("bench needs at least one checkpoint folder")
    names = _labels(folders)
    inputs = [example_input(f, input_size, batch) for f in folders]
    if len({tuple(x.shape) for x in inputs}) > 1:
        raise ValueError(f"the checkpoints take different inputs ({[tuple(x.shape) for x in inputs]}): "
                         "they cannot be timed on one batch")
    models = {name: _load(f, x, fuse) for name, f, x in zip(names, folders, inputs)}
    rows = {name: {"name": name, **_static(f, models[name], x)} for name, f, x in zip(names, folders, inputs)}
    with tempfile.TemporaryDirectory() as tmp:
        timed = dict(models)
        if onnx:
            timed.update(_exported(models, inputs[0], Path(tmp), rows))
        latency = compare_latency(timed, inputs[0], rounds=rounds, runs=runs, warmup=warmup, threads=threads)
    for name, row in rows.items():
        row["latency"], row["latency_ms"] = latency[name], latency[name]["median_ms"]
        if onnx:
            row["onnx_latency"] = latency[f"{name} [onnxruntime]"]
            row["onnx_latency_ms"] = row["onnx_latency"]["median_ms"]
    first = rows[names[0]]
    for row in rows.values():
        row["ratios"] = _ratios(row, first)
    settings = dict(input_size=list(input_size), batch=batch, rounds=rounds, runs=runs, warmup=warmup,
                    threads=threads, fused=fuse, onnx=onnx)
    return dict(settings=settings, machine=machine(), rows=list(rows.values()))


def _exported(models: dict[str, nn.Module], x: torch.Tensor, tmp: Path, rows: dict) -> dict[str, str]:
    """Export every model (parity-checked, static shapes: the benchmarked size) and return their ``.onnx`` paths."""
    paths = {}
    for i, (name, model) in enumerate(models.items()):
        result = export_onnx(model, x, tmp / f"{i}.onnx", dynamic=False)
        rows[name].update(onnx_bytes=result["file_bytes"], onnx_max_abs_diff=result["max_abs_diff"])
        paths[f"{name} [onnxruntime]"] = result["path"]
    return paths


def table(result: dict) -> str:
    """The comparison as a plain-text table, with ratios against the first checkpoint."""
    onnx = result["settings"]["onnx"]
    cols = [("params", "params", "{:,}"), ("MACs (M)", "macs", "{:,.1f}"), ("weights KiB", "weights_bytes", "{:,.1f}"),
            ("eager ms", "latency_ms", "{:.3f}")]
    if onnx:
        cols += [("ONNX KiB", "onnx_bytes", "{:,.1f}"), ("ORT ms", "onnx_latency_ms", "{:.3f}")]
    scale = {"macs": 1e-6, "weights_bytes": 1 / 1024, "onnx_bytes": 1 / 1024}
    width = max(len(r["name"]) for r in result["rows"]) + 2
    header = "checkpoint".ljust(width) + "".join(f"{title:>14}{'ratio':>7}" for title, _, _ in cols)
    lines = [header, "-" * len(header)]
    for row in result["rows"]:
        cells = "".join(f"{fmt.format(row[key] * scale.get(key, 1)):>14}{row['ratios'].get(key, float('nan')):>7.3f}"
                        for _, key, fmt in cols)
        lines.append(row["name"].ljust(width) + cells)
    s = result["settings"]
    lines.append(f"input {s['batch']}×{s['input_size'][0]}×{s['input_size'][1]}, {s['threads']} thread(s), "
                 f"{s['rounds']} interleaved rounds × {s['runs']} runs, median; "
                 f"{'Conv+BN fused' if s['fused'] else 'unfused'}; {result['machine']['processor']}")
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    """Write ``result`` to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
