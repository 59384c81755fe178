"""Compare checkpoints in one run: static cost, and latency measured interleaved (A B A B ...) so drift cancels.

`segprune bench A B ...` is a thin layer over :func:`bench`. Every checkpoint is loaded (a broken one is a
clear error naming its file), run once on the requested input size (a size the model cannot take is a clear
error naming the checkpoint and the size), folded (Conv+BN, as deployed) unless asked not to, and then all are
timed together by :func:`segprune.eval.profile.compare_latency` on every runtime asked for (``runtimes``: eager,
onnxruntime, OpenVINO, TensorRT, ...; each deployment's outputs checked against eager first), all in the same
interleaved rounds. Ratios and speed-ups are against the first checkpoint; a runtime far slower than another on a
checkpoint is flagged with its slowest ops (the runtimes that can profile: onnxruntime, OpenVINO).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from segprune import checkpoint
from segprune.eval.latency import cpu_model
from segprune.eval.profile import compare_latency, count_macs, count_params, file_bytes, peak_memory
from segprune.export.deploy import deploy
from segprune.export.fuse import fuse_conv_bn
from segprune.export.runtimes import get_runtime, parse, runtime_names
from segprune.workflows import rundir

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
    """What the timings were taken on, with the version of every runtime installed."""
    info = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpu=cpu_model(), cpu_count=os.cpu_count(), torch=torch.__version__,
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    for name in runtime_names():
        module = get_runtime(name).module
        if module is not None and get_runtime(name).missing() is None:
            info[module] = importlib.metadata.version(module)
    return info


def bench(folders: list[str | Path], *, input_size: tuple[int, int], batch: int = 1, rounds: int = 7,
          runs: int = 10, warmup: int = 3, threads: int = 1, fuse: bool = True, onnx: bool = False,
          runtimes: Sequence[str] = ("eager",), slow: float = 1.5, json_path: str | Path | None = None,
          force: bool = False) -> dict:
    """Cost and interleaved latency of several checkpoints on one input size, on each runtime asked for.

    Every checkpoint is deployed on every runtime (exported once where a runtime takes ONNX, outputs checked against
    eager); all are timed in the same interleaved rounds. A runtime that is missing or cannot compile a model gives
    that runtime's entry an ``error`` (one line) and the others are still measured.

    Args:
        runtimes: runtime specs (``segprune.export.runtimes``: ``eager``, ``onnxruntime``, ``openvino``,
            ``openvino:fp32``, ``tensorrt:fp16``, ...), each on its first device.
        onnx: the older spelling of adding ``onnxruntime`` to ``runtimes``.
        slow: flag a runtime whose latency is at least this multiple of the fastest runtime's on a checkpoint;
            the flag names the runtime's slowest op types where it can profile (onnxruntime, OpenVINO).
        json_path: Also write the result there as JSON (see :func:`write_json`); claimed before any work, so an
            existing file is refused unless ``force``.

    Returns:
        ``settings``, ``machine`` and ``rows``: per checkpoint its ``name``, ``path``, ``params``, ``macs``,
        ``weights_bytes``, ``peak_memory_bytes``, ``runtimes`` (per spec: ``latency_ms``, ``latency`` (a
        compare_latency row), ``speedup`` against the first checkpoint on that runtime, ``parity``, ``onnx_bytes``;
        or ``error``), ``flags`` (slow runtimes), ``latency_ms`` (eager's) and, with onnxruntime, the older
        ``onnx_latency``/``onnx_latency_ms``/``onnx_bytes``/``onnx_max_abs_diff``; ``ratios`` against the first.
    """
    specs = list(dict.fromkeys([*runtimes, *(["onnxruntime"] if onnx else [])]))
    for spec in specs:
        parse(spec)  # an unknown runtime or precision is refused before any work
    if json_path:
        rundir.claim_file(json_path, force=force, option="--json")
    folders = [Path(f) for f in folders]
    if not folders:
        raise ValueError("bench needs at least one checkpoint folder")
    names = _labels(folders)
    inputs = [example_input(f, input_size, batch) for f in folders]
    if len({tuple(x.shape) for x in inputs}) > 1:
        raise ValueError(f"the checkpoints take different inputs ({[tuple(x.shape) for x in inputs]}): "
                         "they cannot be timed on one batch")
    models = {name: _load(f, x, fuse) for name, f, x in zip(names, folders, inputs)}
    rows = {name: {"name": name, **_static(f, models[name], x), "runtimes": {}, "flags": []}
            for name, f, x in zip(names, folders, inputs)}
    with tempfile.TemporaryDirectory() as tmp:
        compiled = _deployed(models, inputs[0], specs, Path(tmp), threads, rows)
        latency = compare_latency(compiled, inputs[0], rounds=rounds, runs=runs, warmup=warmup, threads=threads)
        for name, spec in compiled:
            rows[name]["runtimes"][spec].update(latency=latency[(name, spec)],
                                                latency_ms=latency[(name, spec)]["median_ms"])
        _flag_slow(rows, compiled, inputs[0], slow)
    _legacy_keys(rows)
    first = rows[names[0]]
    for row in rows.values():
        row["ratios"] = _ratios(row, first)
        for spec, entry in row["runtimes"].items():
            base = first["runtimes"].get(spec, {}).get("latency_ms")
            if base and entry.get("latency_ms"):
                entry["speedup"] = base / entry["latency_ms"]
    settings = dict(input_size=list(input_size), batch=batch, rounds=rounds, runs=runs, warmup=warmup,
                    threads=threads, fused=fuse, onnx=onnx, runtimes=specs)
    result = dict(settings=settings, machine=machine(), rows=list(rows.values()))
    if json_path:
        write_json(result, json_path)
    return result


def _deployed(models: dict[str, nn.Module], x: torch.Tensor, specs: list[str], tmp: Path, threads: int,
              rows: dict) -> dict:
    """Every model on every runtime, keyed (name, spec); a failure is that entry's one-line ``error``."""
    compiled = {}
    for spec in specs:
        for i, (name, model) in enumerate(models.items()):
            try:
                c = deploy(model, x, spec, device=get_runtime(spec).devices[0], threads=threads, folder=tmp,
                           name=str(i))
            except (ImportError, ValueError, RuntimeError) as err:
                rows[name]["runtimes"][spec] = {"error": f"{spec}: {str(err).splitlines()[0]}"}
                continue
            compiled[(name, spec)] = c
            entry = {"precision": c.precision, "inference_precision": c.inference_precision, "parity": c.parity}
            onnx_file = tmp / f"{i}.onnx"
            if onnx_file.exists():
                entry["onnx_bytes"] = onnx_file.stat().st_size
            rows[name]["runtimes"][spec] = entry
    return compiled


def _flag_slow(rows: dict, compiled: dict, x: torch.Tensor, slow: float) -> None:
    """Name, per checkpoint, each runtime at least ``slow`` times slower than the fastest, with its slowest ops."""
    for name, row in rows.items():
        timed = {spec: e["latency_ms"] for spec, e in row["runtimes"].items() if "latency_ms" in e}
        if len(timed) < 2:
            continue
        fastest = min(timed, key=timed.get)
        for spec, ms in timed.items():
            if ms >= slow * timed[fastest]:
                c = compiled[(name, spec)]
                ops = c.profile(c.prepare(x), runs=1)
                row["flags"].append({"runtime": spec, "times_slower": ms / timed[fastest], "fastest": fastest,
                                     "slowest_ops": _by_op(ops)[:5] if ops else None})


def _by_op(ops) -> list[dict]:
    """Profiled op times summed per op type, slowest first, with their share of the run."""
    total, per = sum(o.ms for o in ops) or 1.0, {}
    for o in ops:
        per[o.op] = per.get(o.op, 0.0) + o.ms
    return [{"op": op, "ms": round(ms, 2), "share": round(ms / total, 3)}
            for op, ms in sorted(per.items(), key=lambda kv: -kv[1])]


def _legacy_keys(rows: dict) -> None:
    """The keys `bench` returned before runtimes: eager's latency, and onnxruntime's as ``onnx_*``."""
    for row in rows.values():
        eager, ort = row["runtimes"].get("eager", {}), row["runtimes"].get("onnxruntime", {})
        if "latency_ms" in eager:
            row["latency"], row["latency_ms"] = eager["latency"], eager["latency_ms"]
        if "latency_ms" in ort:
            row.update(onnx_latency=ort["latency"], onnx_latency_ms=ort["latency_ms"], onnx_bytes=ort.get(
                "onnx_bytes"), onnx_max_abs_diff=(ort.get("parity") or {}).get("max_abs_diff"))


def table(result: dict) -> str:
    """The comparison as a plain-text table: static cost, then latency per runtime, with ratios against the first
    checkpoint; then the flags (a runtime far slower than another) and errors."""
    specs = result["settings"].get("runtimes") or ["eager"]
    cols = [("params", "params", "{:,}", 1), ("MACs (M)", "macs", "{:,.1f}", 1e-6),
            ("weights KiB", "weights_bytes", "{:,.1f}", 1 / 1024)]
    width = max(len(r["name"]) for r in result["rows"]) + 2
    header = "checkpoint".ljust(width) + "".join(f"{title:>14}{'ratio':>7}" for title, *_ in cols)
    header += "".join(f"{spec[:13] + ' ms':>17}{'ratio':>7}" for spec in specs)
    lines = [header, "-" * len(header)]
    for row in result["rows"]:
        cells = "".join(f"{fmt.format(row[key] * scale):>14}{row['ratios'].get(key, float('nan')):>7.3f}"
                        for _, key, fmt, scale in cols)
        for spec in specs:
            e = row["runtimes"].get(spec, {})
            cells += f"{e['latency_ms']:>17.3f}{1 / e['speedup']:>7.3f}" if "speedup" in e else f"{'-':>17}{'':>7}"
        lines.append(row["name"].ljust(width) + cells)
    s = result["settings"]
    runs_as = {spec: e["inference_precision"] for r in result["rows"] for spec, e in r["runtimes"].items()
               if "inference_precision" in e}
    lines.append(f"input {s['batch']}×{s['input_size'][0]}×{s['input_size'][1]}, {s['threads']} thread(s), "
                 f"{s['rounds']} interleaved rounds × {s['runs']} runs, median; "
                 f"{'Conv+BN fused' if s['fused'] else 'unfused'}; {result['machine']['processor']}; runs as: "
                 + ", ".join(f"{k} {v}" for k, v in runs_as.items()))
    return "\n".join(lines + _notes(result["rows"]))


def _notes(rows: list[dict]) -> list[str]:
    out = []
    for row in rows:
        for f in row["flags"]:
            ops = ", ".join(f"{o['op']} {o['ms']:.0f} ms ({o['share']:.0%})" for o in f["slowest_ops"] or [])
            out.append(f"slow: {row['name']} on {f['runtime']} is {f['times_slower']:.2f}x slower than on "
                       f"{f['fastest']}" + (f"; slowest ops: {ops}" if ops else ""))
        out += [f"error: {row['name']}: {e['error']}" for e in row["runtimes"].values() if "error" in e]
    return out


def write_json(result: dict, path: str | Path) -> None:
    """Write ``result`` to ``path`` atomically (temporary file, then rename)."""
    rundir.write_atomic(Path(path), json.dumps(result, indent=2) + "\n")
