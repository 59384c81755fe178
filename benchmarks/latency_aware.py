"""Latency-aware pruning (#14): prune to a measured latency budget, and compare with MAC allocation at equal latency.

For each model (random weights, seeded; latency does not depend on the values) and runtime:

1. a :class:`segprune.LatencyTable` is measured (or loaded from ``--tables``, refused if its conditions differ);
2. the model is pruned by latency allocation (``target_latency``; normalised L1 importance per millisecond saved,
   10 % floors, blocks on the table's width steps) to each target, and by MAC allocation (``target_macs``, one
   global L1 threshold) at the MAC target whose *predicted* latency matches, plus MAC allocation at the nominal
   target (``target_macs = target``);
3. all of them and the unpruned model are fused and timed interleaved (one pass each per round, rotating order),
   with ``--threads`` threads; latency_ratio = median after / median before (latency_ratio_min: of the minima, the
   timing least disturbed by the other processes of a shared machine);
4. the table's prediction is checked against measurement on ``--prunings`` random prunings (random scores,
   global or uniform, ratio 0.1-0.6): relative error of the predicted latency ratio.

"At equal latency" compares MACs: the MAC-allocation rows give measured (latency_ratio, macs_ratio) points; the MACs
MAC allocation needs at the latency the latency allocation measured are interpolated between them.

    python benchmarks/latency_aware.py [--models pspnet_resnet50 segnet_vgg16_bn] [--runtimes eager onnxruntime]
        [--targets 0.7 0.5] [--threads 1] [--rounds 3] [--prunings 20] [--tables benchmarks/results/latency_tables]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_result  # noqa: E402

import segprune  # noqa: E402
from segprune.eval.latency import RuntimeTimer, measure_latency_table  # noqa: E402
from segprune.eval.profile import count_macs  # noqa: E402
from segprune.export.fuse import fuse_conv_bn  # noqa: E402
from segprune.export.runtimes import runtime_names  # noqa: E402
from segprune.models import create_model  # noqa: E402
from segprune.prune.graph import channel_groups  # noqa: E402

MODELS = {"pspnet_resnet50": (19, 512, 512, {"aux_head": False}), "segnet_vgg16_bn": (11, 360, 480, {})}
WITHIN = 0.05  # the latency allocation must measure within 5 % of its target


def load_or_measure(name, base, x, runtime, threads, folder: Path, onnx_dir: Path | None):
    path = folder / f"{name}_{x.shape[2]}x{x.shape[3]}_{runtime}_t{threads}.json"
    if path.exists():
        return segprune.LatencyTable.load(path, runtime=runtime, threads=threads, input=x.shape, model=base), path
    table = measure_latency_table(base, x, runtime=runtime, threads=threads, name=name, onnx_dir=onnx_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return table, table.save(path)


def matched_macs(base, x, groups, table, ratio: float) -> float:
    """The MAC target whose MAC allocation the table predicts at `ratio` of the latency (bisection)."""
    lo, hi = 0.05, 1.0
    for _ in range(12):
        mid = (lo + hi) / 2
        pruned = segprune.prune(base, x, target_macs=mid, criterion="l1", groups=groups).model
        lo, hi = (mid, hi) if table.predict_model(pruned) / table.predict() < ratio else (lo, mid)
    return round((lo + hi) / 2, 4)


def variants(base, x, table, targets, groups, nominal: bool) -> dict[str, tuple[str, float, torch.nn.Module]]:
    """label -> (allocation, target, pruned model)."""
    out = {"unpruned": ("none", 1.0, base)}
    for t in targets:
        lat = segprune.prune(base, x, target_latency=t, latency=table, criterion="l1", groups=groups).model
        out[f"latency{int(100 * t)}"] = ("latency", t, lat)
        m = matched_macs(base, x, groups, table, table.predict_model(lat) / table.predict())
        out[f"macs{int(100 * t)}_matched"] = ("macs", m, segprune.prune(base, x, target_macs=m, criterion="l1",
                                                                          groups=groups).model)
        if nominal:
            out[f"macs{int(100 * t)}"] = ("macs", t, segprune.prune(base, x, target_macs=t, criterion="l1",
                                                                      groups=groups).model)
    return out


def timed(models: dict, x, runtime, threads, rounds, onnx_dir: Path | None) -> dict:
    rt = RuntimeTimer(runtime, threads, folder=onnx_dir)
    fused = {label: fuse_conv_bn(m.eval(), x) for label, m in models.items()}
    return rt.time_models(fused, x, rounds)


def rows_for(name, runtime, table, vs, lat, x) -> list[dict]:
    base, base_macs = lat["unpruned"], count_macs(vs["unpruned"][2], x)
    rows = []
    for label, (alloc, target, model) in vs.items():
        if label == "unpruned":
            continue
        ratio = lat[label]["median_ms"] / base["median_ms"]
        row = {"model": name, "runtime": runtime, "label": label, "allocation": alloc, "target": target,
               "latency_ratio": round(ratio, 4), "macs_ratio": round(count_macs(model, x) / base_macs, 4),
               "latency_ratio_min": round(lat[label]["min_ms"] / base["min_ms"], 4),
               "predicted_latency_ratio": round(table.predict_model(model) / table.predict(), 4),
               "median_ms": round(lat[label]["median_ms"], 1), "min_ms": round(lat[label]["min_ms"], 1),
               "unpruned_median_ms": round(base["median_ms"], 1), "unpruned_min_ms": round(base["min_ms"], 1),
               "spread": round(lat[label]["spread"], 3), "unpruned_spread": round(base["spread"], 3), "miou": None}
        if alloc == "latency":
            row["within_5pct"] = abs(ratio - target) <= WITHIN * target
        rows.append(row)
    return rows


def at_equal_latency(rows: list[dict]) -> list[dict]:
    """For each latency-allocation row: the MACs MAC allocation needs for the same measured latency (interpolated
    between the MAC-allocation rows), and how many fewer MACs the latency allocation removes."""
    macs = sorted((r["latency_ratio"], r["macs_ratio"]) for r in rows if r["allocation"] == "macs")
    out = []
    for r in rows:
        if r["allocation"] != "latency" or len(macs) < 2:
            continue
        needed = float(np.interp(r["latency_ratio"], *zip(*macs)))
        inside = macs[0][0] <= r["latency_ratio"] <= macs[-1][0]
        out.append({"model": r["model"], "runtime": r["runtime"], "target": r["target"],
                    "latency_ratio": r["latency_ratio"], "latency_allocation_macs_ratio": r["macs_ratio"],
                    "mac_allocation_macs_ratio": round(needed, 4), "interpolated": inside,
                    "macs_kept_more": round(r["macs_ratio"] - needed, 4)})
    return out


def prediction_check(name, base, x, table, runtime, threads, rounds, n, groups, onnx_dir) -> dict:
    """Predicted vs measured latency ratio over `n` random prunings, timed interleaved with the unpruned model."""
    rng = np.random.default_rng(0)
    models, plans = {"unpruned": base}, []
    for i in range(n):
        ratio, method = float(rng.uniform(0.1, 0.6)), ("global", "uniform")[i % 2]
        models[f"p{i}"] = segprune.prune(base, x, ratio=ratio, select=method, criterion="random", seed=i,
                                         groups=groups).model
        plans.append({"ratio": round(ratio, 3), "method": method})
    lat = timed(models, x, runtime, threads, rounds, onnx_dir)
    base, errors = lat["unpruned"], {"median_ms": [], "min_ms": []}
    for i, plan in enumerate(plans):
        predicted = table.predict_model(models[f"p{i}"]) / table.predict()
        plan["predicted_ratio"] = round(predicted, 4)
        for stat, suffix in (("median_ms", ""), ("min_ms", "_min")):
            measured = lat[f"p{i}"][stat] / base[stat]
            plan[f"measured_ratio{suffix}"] = round(measured, 4)
            plan[f"error{suffix}"] = round(abs(predicted - measured) / measured, 4)
            errors[stat].append(plan[f"error{suffix}"])
    return {"model": name, "runtime": runtime, "rounds": rounds, "prunings": plans,
            "median_error": round(statistics.median(errors["median_ms"]), 4),
            "max_error": round(max(errors["median_ms"]), 4),
            "median_error_min": round(statistics.median(errors["min_ms"]), 4),
            "max_error_min": round(max(errors["min_ms"]), 4), "unpruned_median_ms": round(base["median_ms"], 1),
            "unpruned_min_ms": round(base["min_ms"], 1), "table_predicted_unpruned_ms": round(table.predict(), 1)}


def run_model(name, runtime, args) -> tuple[list[dict], list[dict], dict | None, dict]:
    k, h, w, kwargs = MODELS[name]
    torch.manual_seed(0)
    base = create_model(name, num_classes=k, **kwargs).eval()
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    onnx_dir = Path(tempfile.mkdtemp(prefix=f"lat_{name}_")) if runtime == "onnxruntime" else None
    start = time.perf_counter()
    table, path = load_or_measure(name, base, x, runtime, args.threads, args.tables, onnx_dir)
    info = {"model": name, "runtime": runtime, "table": _shown(path),
            "table_seconds": table.meta.get("seconds"), "table_layer_spread_median": table.meta.get(
                "layer_spread_median"), "steps": {k: [e.step_in, e.step_out] for k, e in table.entries.items()}}
    print(f"{name} {runtime}: table {path} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    groups, rows = channel_groups(base, x), []
    if not args.prediction_only:
        vs = variants(base, x, table, args.targets, groups, runtime in args.nominal_runtimes)
        lat = timed({label: m for label, (_, _, m) in vs.items()}, x, runtime, args.threads, args.rounds, onnx_dir)
        rows = rows_for(name, runtime, table, vs, lat, x)
        print(json.dumps(rows), file=sys.stderr, flush=True)
    check = None
    if args.prunings and runtime in args.check_runtimes:
        check = prediction_check(name, base, x, table, runtime, args.threads, args.check_rounds, args.prunings, groups,
                                 onnx_dir)
    info["seconds"] = round(time.perf_counter() - start, 1)
    return rows, at_equal_latency(rows), check, info


def markdown(data: dict) -> str:
    """The rows, MACs at equal latency and prediction errors as Markdown tables."""
    m = data["machine"]
    lines = [f"# Latency-aware pruning ({m['cpu']}, {m['threads']} thread, batch 1, random weights; {data['rounds']} "
             "interleaved rounds, one pass per model per round)", "",
             "| model | runtime | allocation | target | latency ratio (median) | (min) | predicted | MACs ratio | "
             "within 5 % |", "|---|---|---|---:|---:|---:|---:|---:|:---:|"]
    for r in data["rows"]:
        if "label" not in r:  # a CamVid accuracy row (latency_camvid.py): its own table below
            continue
        met = {True: "met", False: "**missed**", None: ""}[r.get("within_5pct")]
        lines.append(f"| {r['model']} | {r['runtime']} | {r['label']} | {r['target']:.3g} | {r['latency_ratio']:.3f} | "
                     f"{r['latency_ratio_min']:.3f} | {r['predicted_latency_ratio']:.3f} | {r['macs_ratio']:.3f} | "
                     f"{met} |")
    lines += ["", "At equal measured latency (MAC allocation's MACs interpolated between its rows; where the "
              "latency lies below them, the nearest row is given, and MAC allocation needs fewer MACs than that):", "",
              "| model | runtime | latency ratio | MACs kept, latency allocation | MACs kept, MAC allocation | "
              "more MACs kept |", "|---|---|---:|---:|---:|---:|"]
    for r in data["equal_latency"]:
        note = "" if r["interpolated"] else " (nearest row: needs fewer)"
        lines.append(f"| {r['model']} | {r['runtime']} | {r['latency_ratio']:.3f} | "
                     f"{r['latency_allocation_macs_ratio']:.3f} | {r['mac_allocation_macs_ratio']:.3f}{note} | "
                     f"{r['macs_kept_more']:+.3f} |")
    lines += ["", "Prediction of the latency ratio over random prunings (relative error):", "",
              "| model | runtime | prunings | median error (median timings) | max | median error (min timings) | max |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for c in data["prediction"]:
        lines.append(f"| {c['model']} | {c['runtime']} | {len(c['prunings'])} | {c['median_error']:.1%} | "
                     f"{c['max_error']:.1%} | {c['median_error_min']:.1%} | {c['max_error_min']:.1%} |")
    camvid = [r for r in data["rows"] if "label" not in r]
    if camvid:
        lines += ["", "Accuracy at equal measured latency on CamVid (benchmarks/latency_camvid.py; mean ± s.e. over "
                  "seeds; details in latency_camvid_<importance>.md):", "",
                  "| model | runtime | allocation | target | latency ratio | MACs ratio | test mIoU % |",
                  "|---|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['runtime']} | {r['allocation']} | {r['target']} | {r['latency_ratio']:.3f} | "
                  f"{r['macs_ratio']:.3f} | {100 * r['miou']:.2f} ± {100 * r['miou_se']:.2f} |" for r in camvid]
    return "\n".join(lines + ["", "Commands: " + "; ".join(f"`{c}`" for c in data["commands"])]) + "\n"


def _shown(path: Path) -> str:
    """The table's path relative to the repository when it lies inside it."""
    root = RESULTS.parent.parent.resolve()
    return str(path.resolve().relative_to(root)) if path.resolve().is_relative_to(root) else str(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--runtimes", nargs="+", default=["eager", "onnxruntime"], choices=list(runtime_names()))
    p.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--check-rounds", type=int, default=3, help="rounds of the prediction check")
    p.add_argument("--prunings", type=int, default=20, help="random prunings for the prediction check (0: none)")
    p.add_argument("--check-runtimes", nargs="+", default=["eager"], help="runtimes the prediction is checked on")
    p.add_argument("--nominal-runtimes", nargs="*", default=["eager"],
                   help="runtimes that also time MAC allocation at target_macs = target (onnxruntime exports cost "
                        "minutes each)")
    p.add_argument("--tables", type=Path, default=RESULTS / "latency_tables")
    p.add_argument("--out", default="latency_aware")
    p.add_argument("--prediction-only", action="store_true", help="only the prediction check (with "
                   "--check-runtimes): no allocation rows")
    p.add_argument("--render", action="store_true", help="only write the Markdown of the existing results file")
    p.add_argument("--append", action="store_true", help="add to the rows of an existing results file (a later run "
                   "of other runtimes or models); its commands are kept")
    args = p.parse_args()
    command = "python benchmarks/latency_aware.py " + " ".join(sys.argv[1:])
    data = {"benchmark": "latency_aware", "machine": {**machine(), "threads": args.threads}, "rounds": args.rounds,
            "commands": [command], "rows": [], "equal_latency": [], "prediction": [], "runs": []}
    previous = RESULTS / f"{args.out}.json"
    if args.render:
        (RESULTS / f"{args.out}.md").write_text(markdown(json.loads(previous.read_text())))
        return
    if args.append and previous.exists():
        data = json.loads(previous.read_text())
        data["commands"].append(command)
    for runtime in args.runtimes:
        for name in args.models:
            rows, equal, check, info = run_model(name, runtime, args)
            data["rows"] += rows
            data["equal_latency"] += equal
            data["prediction"] += [check] if check else []
            data["runs"].append(info)
            write_result(args.out, data)  # after every model: a long run keeps what it measured
            (RESULTS / f"{args.out}.md").write_text(markdown(data))


if __name__ == "__main__":
    main()
