"""Adaptive average pooling to non-dividing bins (PSPNet-R50 at 512²: 3×3 and 6×6 bins on a 64×64 map), exported
as the dynamo exporter writes it (``pool_indices="native"``: gathered windows, Transpose, ReduceMean) and in
segprune's export form (averaging matrices, ``segprune.export.pooling.MatrixAdaptiveAvgPool``): per runtime, both
deployed (outputs checked against eager), timed interleaved, 1 thread, median of the rounds.

    python benchmarks/pooling_export.py [--runtimes onnxruntime openvino:fp32 openvino:default] [--rounds 5]

Results: results/pooling_export.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result  # noqa: E402
from runtimes import build  # noqa: E402

from segprune.eval.latency import time_interleaved  # noqa: E402
from segprune.export.deploy import deploy  # noqa: E402
from segprune.export.fuse import fuse_conv_bn  # noqa: E402
from segprune.export.onnx import export_onnx  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtimes", nargs="+", default=["onnxruntime", "openvino:fp32", "openvino:default"])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    base, x = build("pspnet_resnet50")
    fused, rows = fuse_conv_bn(base, x), []
    with tempfile.TemporaryDirectory() as folder:
        for form in ("native", "argmax"):  # deploy() reuses an export of the same name in the folder
            export_onnx(fused, x, Path(folder) / f"{form}.onnx", dynamic=False, check=False, pool_indices=form)
        for spec in args.runtimes:
            compiled = {form: deploy(fused, x, spec, threads=1, folder=folder, name=form) for form in ("native",
                                                                                                   "argmax")}
            timed = time_interleaved(compiled, x, rounds=args.rounds, threads=1)
            rows.append({"runtime": spec, "inference_precision": compiled["native"].inference_precision,
                         "native_ms": round(timed["native"]["median_ms"], 1),
                         "export_form_ms": round(timed["argmax"]["median_ms"], 1),
                         "speedup": round(timed["native"]["median_ms"] / timed["argmax"]["median_ms"], 3),
                         "parity_max_abs_diff": {k: c.parity["max_abs_diff"] for k, c in compiled.items()}})
            print(rows[-1], flush=True)
    write_result("pooling_export", {"machine": machine(), "model": "pspnet_resnet50", "input": list(x.shape),
                                    "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
