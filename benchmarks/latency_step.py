"""Where a runtime's latency steps: two latency allocations of PSPNet-R50 close in allocation but far apart in
measured latency (results/runtimes_xeon.md: OpenVINO bf16, 0.395 -> 0.395 but 0.409 -> 0.566), deployed, timed
interleaved and profiled per op, with the layer widths that differ between them.

    python benchmarks/latency_step.py [--runtime openvino:default] [--allocations 0.3951 0.4091]
        [--table results/latency_tables_xeon/pspnet_resnet50_512x512_openvino_default_t1.json]

Results: results/latency_step.json (per allocation: median ms, op-type totals, the slowest ops; the width changes),
measured with the native export of adaptive pooling; results/latency_step_export_form.json, the same at 1620975,
with adaptive pooling exported as averaging matrices (the step is gone).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_result  # noqa: E402
from runtimes import build  # noqa: E402

import segprune  # noqa: E402
from segprune.eval.latency import time_interleaved  # noqa: E402
from segprune.export.deploy import deploy  # noqa: E402
from segprune.export.fuse import fuse_conv_bn  # noqa: E402
from segprune.prune.graph import channel_groups  # noqa: E402
from segprune.prune.latency import LatencyTable  # noqa: E402


def widths(model: torch.nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}


def profiled(compiled, x) -> dict:
    ops = compiled.profile(compiled.prepare(x), runs=3) or []
    by_type = collections.Counter()
    for op in ops:
        by_type[op.op] += op.ms
    return {"profiled_ms": round(sum(o.ms for o in ops), 1),
            "by_op_type": {k: round(v, 1) for k, v in by_type.most_common(6)},
            "slowest": [{"name": o.name, "op": o.op, "ms": round(o.ms, 1)} for o in ops[:6]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", default="openvino:default")
    ap.add_argument("--allocations", nargs=2, type=float, default=[0.3951, 0.4091])
    ap.add_argument("--table", type=Path,
                    default=RESULTS / "latency_tables_xeon" / "pspnet_resnet50_512x512_openvino_default_t1.json")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--name", default="latency_step", help="results/NAME.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base, x = build("pspnet_resnet50")
    table, groups = LatencyTable.load(args.table, model=base), channel_groups(base, x)
    models, compiled = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for aim in args.allocations:
            key = f"allocated_for_{aim}"
            models[key] = segprune.prune(base, x, target_latency=aim, latency=table, criterion="l1",
                                         groups=groups).model
            compiled[key] = deploy(fuse_conv_bn(models[key], x), x, args.runtime, threads=1, folder=folder, name=key)
        timed = time_interleaved(compiled, x, rounds=args.rounds, threads=1)
        rows = {k: {"median_ms": round(timed[k]["median_ms"], 1), "inference_precision":
                    compiled[k].inference_precision, **profiled(compiled[k], x)} for k in compiled}
    (a, wa), (b, wb) = ((k, widths(m)) for k, m in models.items())
    result = {"machine": machine(), "runtime": args.runtime, "table": args.table.name, "allocations": rows,
              "width_changes": {n: [wa[n], wb[n]] for n in wa if wa[n] != wb[n]}}
    write_result(args.name, result)


if __name__ == "__main__":
    main()
