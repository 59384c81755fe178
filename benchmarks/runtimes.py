"""Prune for the runtime you ship on (#22): the same prunings timed on eager PyTorch, onnxruntime and OpenVINO, and
latency allocation, closed-loop, to measured targets on each.

For each model (random weights, seeded; latency does not depend on the values), 1 thread:

1. **Speed-ups.** The unpruned model and MAC allocations to 50 % and 70 % of the MACs (one global L1 threshold,
   with round_to none / 8 / 16) are fused, exported once (ONNX, static shapes, shared by onnxruntime and OpenVINO)
   and deployed on every runtime (outputs checked against eager first); per runtime all of them are timed
   interleaved (one pass each per round, rotating order), median over the rounds. Rows: latency, speed-up
   (unpruned / pruned) and speed-up per MAC saved (speed-up × MAC ratio: 1.0 when time falls as MACs do).
2. **Latency allocation, closed loop.** Per CPU runtime a latency table (reused from ``--tables`` when its
   conditions match, else measured and saved there), then ``prune(target_latency=t, measure=LatencyMeter(...))``
   for each target: allocate, measure on the runtime, correct, until within 5 % either way. Then MAC allocation is
   brought, by the same closed loop on ``target_macs``, to the latency the latency allocation measured, and the
   MACs each keeps at that equal measured latency are compared.

    python benchmarks/runtimes.py [--models pspnet_resnet50 segnet_vgg16_bn] [--rounds 5]
        [--runtimes eager onnxruntime openvino:fp32 openvino:default] [--stage speedups allocation]

Results: results/runtimes.json (rows: model, runtime, precision, inference_precision, allocation
(latency/macs/none), target, latency_ratio, ...) and results/runtimes.md. Partial results are kept in
results/runtimes.partial.json after every row, and rows already there are not measured again.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_result  # noqa: E402

import segprune  # noqa: E402
from segprune.eval.latency import LatencyMeter, RuntimeTimer, cpu_model, measure_latency_table, time_interleaved  # noqa: E402
from segprune.eval.profile import count_macs  # noqa: E402
from segprune.export.deploy import deploy  # noqa: E402
from segprune.export.fuse import fuse_conv_bn  # noqa: E402
from segprune.export.runtimes import get_runtime, parse  # noqa: E402
from segprune.models import create_model  # noqa: E402
from segprune.prune.api import closed_loop  # noqa: E402
from segprune.prune.graph import channel_groups  # noqa: E402

MODELS = {"pspnet_resnet50": (19, 512, 512, {"aux_head": False}), "segnet_vgg16_bn": (11, 360, 480, {}),
          "test_pspnet": (19, 128, 128, {"aux_head": False}), "test_segnet": (11, 128, 128, {})}  # test_*: --quick
NAME = "runtimes"
PARTIAL = RESULTS / f"{NAME}.partial.json"
WITHIN = 0.05


def build(name: str):
    classes, h, w, kwargs = MODELS[name]
    torch.manual_seed(0)
    model = create_model(name, num_classes=classes, **kwargs).eval()
    return model, torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))


def versions() -> dict:
    out = {}
    for spec in ("onnxruntime", "openvino"):
        rt = get_runtime(spec)
        if rt.missing() is None:
            out[rt.module] = RuntimeTimer(spec).versions()[rt.module]
    return out


def load_partial() -> list[dict]:
    return json.loads(PARTIAL.read_text())["rows"] if PARTIAL.exists() else []


def save_partial(rows: list[dict]) -> None:
    tmp = PARTIAL.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    tmp.replace(PARTIAL)


def done(rows, **key) -> bool:
    return any(all(r.get(k) == v for k, v in key.items()) for r in rows)


# --- 1. speed-ups -------------------------------------------------------------------------------------------------
def prunings(base, x, groups) -> dict[str, tuple[float | None, int | None, torch.nn.Module]]:
    out = {"unpruned": (None, None, base)}
    for keep in (0.5, 0.7):
        for step in (None, 8, 16):
            pruned = segprune.prune(base, x, target_macs=keep, criterion="l1", groups=groups, round_to=step).model
            out[f"macs{int(keep * 100)}" + (f"_r{step}" if step else "")] = (keep, step, pruned)
    return out


def speedups(name, runtimes, rounds, rows) -> None:
    base, x = build(name)
    if all(done(rows, model=name, stage="speedups", runtime=spec) for spec in runtimes):
        return
    groups = channel_groups(base, x)
    variants = prunings(base, x, groups)
    macs = {k: count_macs(m, x) for k, (_, _, m) in variants.items()}
    fused = {k: fuse_conv_bn(m, x) for k, (_, _, m) in variants.items()}
    with tempfile.TemporaryDirectory() as folder:
        for spec in runtimes:
            if done(rows, model=name, stage="speedups", runtime=spec):
                continue
            row0 = dict(model=name, stage="speedups", runtime=spec, input=list(x.shape))
            try:
                start = time.perf_counter()
                compiled = {k: deploy(m, x, spec, threads=1, folder=folder, name=k) for k, m in fused.items()}
                deployed_s = time.perf_counter() - start
                timed = time_interleaved(compiled, x, rounds=rounds, threads=1)
            except (ImportError, ValueError, RuntimeError) as err:
                rows.append({**row0, "error": str(err).splitlines()[0]})
                save_partial(rows)
                continue
            first = next(iter(compiled.values()))
            for k, (keep, step, _) in variants.items():
                speedup = timed["unpruned"]["median_ms"] / timed[k]["median_ms"]
                macs_ratio = macs[k] / macs["unpruned"]
                rows.append({**row0, "precision": parse(spec)[1], "inference_precision": first.inference_precision,
                             "allocation": "none" if keep is None else "macs", "target": keep, "round_to": step,
                             "variant": k, "latency_ms": round(timed[k]["median_ms"], 2),
                             "latency_ratio": round(1 / speedup, 4), "speedup": round(speedup, 3),
                             "macs_ratio": round(macs_ratio, 4), "speedup_per_mac": round(speedup * macs_ratio, 3),
                             "spread": round(timed[k]["spread"], 3), "parity_max_abs_diff": compiled[k].parity[
                                 "max_abs_diff"], "parity_unstable": bool(compiled[k].parity.get("unstable")),
                             "deploy_s": round(deployed_s, 1)})
            save_partial(rows)
            print(f"{name} {spec}: unpruned {timed['unpruned']['median_ms']:.0f} ms", flush=True)


# --- 2. latency allocation, closed loop ---------------------------------------------------------------------------
def table_for(name, base, x, spec, folder: Path):
    runtime, precision = parse(spec)
    path = folder / f"{name}_{x.shape[2]}x{x.shape[3]}_{runtime.name}" \
                    f"{'' if precision == 'fp32' else '_' + precision}_t1.json"
    if path.exists():
        try:
            return segprune.LatencyTable.load(path, runtime=runtime.name, precision=precision, threads=1,
                                              input=x.shape, cpu=cpu_model(), model=base), path, "reused"
        except ValueError as err:
            print(f"{path.name} refused, measuring again: {err}", flush=True)
    table = measure_latency_table(base, x, runtime=spec, threads=1, name=name)
    folder.mkdir(parents=True, exist_ok=True)
    return table, table.save(path), "measured"


def allocation(name, runtimes, targets, rounds, tables: Path, rows) -> None:
    base, x = build(name)
    groups, macs0 = None, None
    for spec in runtimes:
        if all(done(rows, model=name, stage="allocation", runtime=spec, target=t, allocation="macs")
               for t in targets):
            continue
        if get_runtime(spec).devices[0] != "cpu":
            continue
        groups = groups or channel_groups(base, x)
        macs0 = macs0 or count_macs(base, x)
        start = time.perf_counter()
        table, path, how = table_for(name, base, x, spec, tables)
        table_s = time.perf_counter() - start
        meter = LatencyMeter(base, x, spec, threads=1, rounds=rounds)
        if parse(spec)[1] == "default" and meter.base.inference_precision == "fp32" and f"{parse(spec)[0].name}:fp32" \
                in runtimes:
            rows.extend({"model": name, "stage": "allocation", "runtime": spec, "target": t, "allocation": a,
                         "skipped": "runs fp32 on this CPU: the same as the fp32 rows"}
                        for t in targets for a in ("latency", "macs"))
            save_partial(rows)
            meter.close()
            continue
        row0 = dict(model=name, stage="allocation", runtime=spec, precision=parse(spec)[1],
                    inference_precision=meter.base.inference_precision, input=list(x.shape), table=path.name,
                    table_source=how, table_s=round(table_s, 1))
        for t in targets:
            if done(rows, model=name, stage="allocation", runtime=spec, target=t, allocation="macs"):
                continue
            start = time.perf_counter()
            lat = segprune.prune(base, x, target_latency=t, latency=table, criterion="l1", groups=groups,
                                 measure=meter)
            rows.append({**row0, "allocation": "latency", "target": t, **_summary(lat, x, macs0),
                         "seconds": round(time.perf_counter() - start, 1)})
            save_partial(rows)
            equal = lat.latency["measured_ratio"]
            start = time.perf_counter()
            cut = functools.partial(mac_allocation, base, x, groups)
            mac = closed_loop(cut, meter, target=equal, table=table, tries=6, tolerance=0.04)  # aims within 2 %
            rows.append({**row0, "allocation": "macs", "target": t, "matched_to": round(equal, 4),
                         **_summary(mac, x, macs0), "seconds": round(time.perf_counter() - start, 1)})
            save_partial(rows)
            print(f"{name} {spec} {t}: latency {equal:.3f} ({rows[-2]['macs_ratio']:.3f} MACs), MAC allocation "
                  f"{mac.latency['measured_ratio']:.3f} ({rows[-1]['macs_ratio']:.3f} MACs)", flush=True)
        meter.close()


def mac_allocation(base, x, groups, aim: float):
    return segprune.prune(base, x, target_macs=aim, criterion="l1", groups=groups)


def _summary(result, x, macs0) -> dict:
    lat = result.latency
    return {"latency_ratio": round(lat["measured_ratio"], 4), "met": lat["met"],
            "within": round(lat["measured_ratio"] / lat["target"] - 1, 4),
            "macs_ratio": round(count_macs(result.model, x) / macs0, 4), "tries": lat["tries"]}


# --- results ------------------------------------------------------------------------------------------------------
def render(result: dict) -> str:
    rows = result["rows"]
    lines = ["# Pruning per runtime (#22)", "", f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} "
             f"cores, 1 thread; torch {result['machine']['torch']}, " + ", ".join(
                 f"{k} {v}" for k, v in result["versions"].items()) + f"; {result['machine']['date']}.", "",
             "## Unpruned latency and speed-up of MAC allocation", "",
             "| model | runtime | runs as | unpruned ms | speed-up at 50 % MACs (r1 / r8 / r16) | speed-up at 70 % "
             "MACs (r1 / r8 / r16) | speed-up per MAC at 50 % |", "|---|---|---|---|---|---|---|"]
    for (model, spec), group in _by(rows, "speedups", ("model", "runtime")).items():
        if "error" in group[0]:
            lines.append(f"| {model} | {spec} | - | {group[0]['error']} | | | |")
            continue
        v = {r["variant"]: r for r in group}
        unstable = " ‡" if any(r.get("parity_unstable") for r in group) else ""
        lines.append(f"| {model} | {spec} | {v['unpruned']['inference_precision']}{unstable} | "
                     f"{v['unpruned']['latency_ms']:.0f} | {_speedups(v, 'macs50')} | {_speedups(v, 'macs70')} | "
                     f"{v['macs50']['speedup_per_mac']:.2f} |")
    if any(r.get("parity_unstable") for r in rows):
        lines += ["", "‡ outputs off eager's by more than the precision's tolerance, within twice what eager itself "
                  "moves when the input moves by a tenth of it (max-unpooling indices flipping between near-equal "
                  "maxima of random weights; `segprune.export.deploy.parity`)."]
    lines += ["", "## Latency allocation to measured targets (closed loop), and MAC allocation at equal latency", "",
              "| model | runtime | target | latency alloc.: measured (tries) | MACs kept | MAC alloc.: measured | "
              "MACs kept | met |", "|---|---|---|---|---|---|---|---|"]
    for (model, spec, t), group in _by(rows, "allocation", ("model", "runtime", "target")).items():
        a = {r["allocation"]: r for r in group}
        if "latency" not in a or "skipped" in a["latency"]:
            continue
        lat, mac = a["latency"], a.get("macs")
        lines.append(f"| {model} | {spec} | {t} | {lat['latency_ratio']:.3f} ({len(lat['tries'])}) | "
                     f"{lat['macs_ratio']:.3f} | {mac['latency_ratio'] if mac else '-'} | "
                     f"{mac['macs_ratio'] if mac else '-'} | {'yes' if lat['met'] else 'no'} |")
    lines += ["", f"Best absolute latency: {result['best_runtime']}"]
    return "\n".join(lines) + "\n"


def _speedups(variants: dict, keep: str) -> str:
    return " / ".join(f"{variants[keep + sfx]['speedup']:.2f}" for sfx in ("", "_r8", "_r16"))


def _by(rows, stage, keys) -> dict:
    out = {}
    for r in rows:
        if r["stage"] == stage:
            out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def best_runtime(rows) -> dict:
    unpruned = [r for r in rows if r["stage"] == "speedups" and r.get("variant") == "unpruned"]
    return {m: min((r for r in unpruned if r["model"] == m), key=lambda r: r["latency_ms"])["runtime"]
            for m in {r["model"] for r in unpruned}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--runtimes", nargs="+", default=["eager", "onnxruntime", "openvino:fp32", "openvino:default"])
    ap.add_argument("--targets", nargs="+", type=float, default=[0.7, 0.5])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--stage", nargs="+", default=["speedups", "allocation"], choices=["speedups", "allocation"])
    ap.add_argument("--tables", type=Path, default=RESULTS / "latency_tables")
    ap.add_argument("--render", action="store_true", help="only write runtimes.md from runtimes.json")
    ap.add_argument("--finish", action="store_true", help="write the results from the partial rows, measuring nothing")
    ap.add_argument("--quick", action="store_true", help="test_* models (a smoke run; results *_quick.*)")
    ap.add_argument("--name", default="runtimes", help="results/NAME.{json,md}: one per machine (tables are per CPU)")
    args = ap.parse_args()
    global NAME, PARTIAL
    NAME, PARTIAL = args.name, RESULTS / f"{args.name}.partial.json"
    if args.quick:
        NAME, args.models = "runtimes_quick", ["test_pspnet"]
        PARTIAL, args.tables = RESULTS / f"{NAME}.partial.json", Path(tempfile.mkdtemp())
    if args.render:
        result = json.loads((RESULTS / f"{NAME}.json").read_text())
        (RESULTS / f"{NAME}.md").write_text(render(result))
        return
    torch.set_num_threads(1)
    rows = load_partial()
    for name in [] if args.finish else args.models:
        if "speedups" in args.stage:
            speedups(name, args.runtimes, args.rounds, rows)
        if "allocation" in args.stage:
            allocation(name, args.runtimes, args.targets, args.rounds, args.tables, rows)
    result = {"machine": machine(), "versions": versions(), "settings": vars(args) | {"tables": str(args.tables)},
              "rows": rows, "best_runtime": best_runtime(rows)}
    write_result(NAME, result)
    (RESULTS / f"{NAME}.md").write_text(render(result))


if __name__ == "__main__":
    main()
