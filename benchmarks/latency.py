"""Does the speed follow the MACs? Measured speed-up of pruned + fused models against their MAC ratio (issue #7).

PSPNet-ResNet50 at 512×512 (19 classes) and SegNet-VGG16-BN at 360×480 (11 classes), built with random weights
(seeded; no trained full-size weights exist on this machine, and latency does not depend on the values), are pruned
by the global method (normalised L1 filter norms, one threshold, 10 % per-layer floor) to 50 % and 70 % of their
MACs, with and without ``round_to=8``; every model, the unpruned one included, is fused (Conv–BN) before timing.
Each runtime times all five variants of a model interleaved (A B C D E, rotating), batch 1, fixed threads, median of
per-round medians. speed-up = latency(unpruned) / latency(pruned); MAC ratio = MACs(unpruned) / MACs(pruned); the
goal is speed-up ≥ 0.85 × MAC ratio.

Runtimes: PyTorch eager on CPU, and onnxruntime on CPU when ``segprune[onnx]`` is installed.

    python benchmarks/latency.py [--rounds 5] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_result  # noqa: E402

import segprune  # noqa: E402
from segprune.eval.profile import compare_latency, count_macs, count_params  # noqa: E402
from segprune.export.fuse import fuse_conv_bn  # noqa: E402
from segprune.models import create_model  # noqa: E402

GOAL = 0.85
RUNTIMES = ("eager", "onnxruntime")
MODELS = [  # (name, num_classes, H, W, builder kwargs)
    ("pspnet_resnet50", 19, 512, 512, {"aux_head": False}),
    ("segnet_vgg16_bn", 11, 360, 480, {}),
]
VARIANTS = [("unpruned", None, None), ("macs50", 0.5, None), ("macs50_r8", 0.5, 8), ("macs70", 0.7, None),
            ("macs70_r8", 0.7, 8)]


def variants(name: str, num_classes: int, x: torch.Tensor, kwargs: dict) -> dict[str, torch.nn.Module]:
    """The unpruned model and its four prunings, all fused, in eval mode."""
    torch.manual_seed(0)
    base = create_model(name, num_classes=num_classes, **kwargs).eval()
    out = {}
    for label, target, round_to in VARIANTS:
        model = base if target is None else segprune.prune(
            base, x, target_macs=target, criterion="l1", round_to=round_to).model
        out[label] = fuse_conv_bn(model.eval(), x)
    return out


def onnx_runners(models: dict[str, torch.nn.Module], x: torch.Tensor, folder: Path, threads: int, prefix: str = ""):
    """onnxruntime runners of every model, exported with a static shape and checked (None without the onnx extra).

    Parity is checked at 1e-4 absolute plus 1e-3 of the largest logit: untrained full-size models have logits in
    the thousands, where float32 rounding alone exceeds 1e-4 (see export/onnx.py)."""
    try:
        from segprune.eval.profile import OrtRunner
        from segprune.export.onnx import ExportError, export_onnx
    except ImportError as err:
        print(f"onnxruntime skipped: {err}", file=sys.stderr)
        return None, {}
    runners, exports = {}, {}
    for label, model in models.items():
        path, start = folder / f"{prefix}{label}.onnx", time.perf_counter()
        sidecar = path.with_suffix(".json")
        if path.exists() and sidecar.exists():  # exported by an earlier --export-only run into --onnx-dir
            exports[label] = json.loads(sidecar.read_text())
            runners[label] = OrtRunner(path, threads=threads)
            continue
        try:
            info = export_onnx(model, x, path, dynamic=False, rtol=1e-3)
            parity = "passed"
        except ExportError as err:  # e.g. SegNet: an unpool index flips between near-equal maxima; time it anyway
            if "disagrees" not in str(err):
                raise
            info = export_onnx(model, x, path, dynamic=False, check=False)
            parity = f"failed: {err}"  # the message gives the difference and eager's own sensitivity
        exports[label] = {**{k: info[k] for k in ("exporter", "max_abs_diff", "file_bytes", "nodes")},
                          "parity": parity, "export_s": round(time.perf_counter() - start, 1)}
        sidecar.write_text(json.dumps(exports[label]))
        print(f"exported {label}: {exports[label]}", file=sys.stderr, flush=True)
        runners[label] = OrtRunner(path, threads=threads)
    return runners, exports


def rows(label_costs: dict, latency: dict, runtime: str) -> list[dict]:
    base_ms, base_macs = latency["unpruned"]["median_ms"], label_costs["unpruned"]["macs"]
    out = []
    for label, lat in latency.items():
        speedup, mac_ratio = base_ms / lat["median_ms"], base_macs / label_costs[label]["macs"]
        out.append({"variant": label, "runtime": runtime, **label_costs[label], "median_ms": round(lat["median_ms"], 2),
                    "p90_ms": round(lat["p90_ms"], 2), "speedup": round(speedup, 3), "mac_ratio": round(mac_ratio, 3),
                    "efficiency": round(speedup / mac_ratio, 3),
                    "goal_met": None if label == "unpruned" else speedup >= GOAL * mac_ratio})  # fmt: skip
    return out


def measure(name, num_classes, h, w, kwargs, *, rounds: int, runs: int, threads: int, runtimes=RUNTIMES,
            onnx_dir: Path | None = None, export_only: bool = False) -> dict:
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    models = variants(name, num_classes, x, kwargs)
    costs = {label: {"params": count_params(m), "macs": count_macs(m, x)} for label, m in models.items()}
    out = {"model": name, "num_classes": num_classes, "input": [1, 3, h, w], "rows": []}
    if "eager" in runtimes and not export_only:
        lat = compare_latency(models, x, rounds=rounds, runs=runs, warmup=1, threads=threads)
        out["rows"] += rows(costs, lat, "eager")
    if "onnxruntime" not in runtimes:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) if onnx_dir is None else onnx_dir
        folder.mkdir(parents=True, exist_ok=True)
        runners, out["onnx"] = onnx_runners(models, x, folder, threads, prefix=f"{name}_{h}x{w}_")
        if runners is not None and not export_only:
            lat = compare_latency(runners, x, rounds=rounds, runs=runs, warmup=1, threads=threads)
            out["rows"] += rows(costs, lat, "onnxruntime")
    return out


def markdown(data: dict) -> str:
    lines = [f"# Latency vs MACs ({data['machine']['cpu']}, {data['threads']} threads, batch 1, "
             f"median of {data['rounds']} interleaved rounds × {data['runs']} runs)", "",
             "| model | variant | runtime | params | GMACs | median ms | speed-up | MAC ratio | speed-up / MAC ratio "
             f"| ≥ {GOAL} |", "|---|---|---|---:|---:|---:|---:|---:|---:|:---:|"]  # fmt: skip
    for m in data["models"]:
        for r in m["rows"]:
            met = "" if r["goal_met"] is None else ("met" if r["goal_met"] else "**not met**")
            lines.append(f"| {m['model']} {m['input'][2]}×{m['input'][3]} | {r['variant']} | {r['runtime']} | "
                         f"{r['params'] / 1e6:.2f} M | {r['macs'] / 1e9:.1f} | {r['median_ms']:.0f} | "
                         f"{r['speedup']:.2f} | {r['mac_ratio']:.2f} | {r['efficiency']:.2f} | {met} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="quarter-size inputs, 2 rounds (a smoke run)")
    parser.add_argument("--no-onnx", action="store_true", help="eager PyTorch only (exports take minutes each)")
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=RUNTIMES,
                        help="runtimes to time; the other runtime's rows are kept from the last results file")
    parser.add_argument("--onnx-dir", type=Path, help="keep the exports here and reuse them on the next run")
    parser.add_argument("--export-only", action="store_true", help="export and check into --onnx-dir, time nothing")
    args = parser.parse_args()
    runtimes = ("eager",) if args.no_onnx else tuple(args.runtimes)
    if args.export_only and args.onnx_dir is None:
        parser.error("--export-only needs --onnx-dir (where the next run finds the exports)")
    start = time.perf_counter()
    specs = [(n, k, h // 4, w // 4, kw) if args.quick else (n, k, h, w, kw) for n, k, h, w, kw in MODELS]
    rounds = 2 if args.quick else args.rounds
    data = {"benchmark": "latency", "machine": machine(), "threads": args.threads, "rounds": rounds,
            "runs": args.runs, "goal": f"speed-up >= {GOAL} x MAC ratio",
            "runtimes": list(runtimes),
            "models": [measure(*s, rounds=rounds, runs=args.runs, threads=args.threads, runtimes=runtimes,
                               onnx_dir=args.onnx_dir, export_only=args.export_only) for s in specs]}
    data["seconds"] = round(time.perf_counter() - start, 1)
    if args.export_only:
        print(json.dumps([m.get("onnx") for m in data["models"]], indent=1))
        return
    name = "latency_quick" if args.quick else "latency"
    _keep_other_runtimes(data, RESULTS / f"{name}.json")
    write_result(name, data)
    (RESULTS / f"{name}.md").write_text(markdown(data))


def _keep_other_runtimes(data: dict, previous: Path) -> None:
    """Rows of runtimes not timed in this run come from the last results file (marked with when they ran)."""
    if not previous.exists() or set(data["runtimes"]) == set(RUNTIMES):
        return
    old = json.loads(previous.read_text())
    for model in data["models"]:
        before = next((m for m in old.get("models", []) if m["model"] == model["model"]), None)
        if before is None:
            continue
        kept = [r for r in before["rows"] if r["runtime"] not in data["runtimes"]]
        when = old["machine"].get("date", "an earlier run")
        model["rows"] = [*[{**r, "from_run": r.get("from_run", when)} for r in kept], *model["rows"]]
        if "onnx" not in model and "onnx" in before:
            model["onnx"] = before["onnx"]


if __name__ == "__main__":
    main()
