"""Engine benchmark: trace + group + prune time and peak memory on a full-size PSPNet-ResNet101, against the
leading peer (torch-pruning's DependencyGraph + BNScalePruner), in the same run.

Each measurement runs in a fresh child process (peak memory is per process), interleaved ours/peer/ours/peer
so that machine drift cancels; the medians are reported with their ratio.

    python benchmarks/engine.py [--rounds 3] [--size 512] [--model pspnet_resnet101]

`prune` verifies its own result by default (see segprune.prune.verify); the cost of that check is measured by
adding the variant `ours_noverify` (prune(verify=False)) and writing elsewhere, without the peer:

    python benchmarks/engine.py --variants ours,ours_noverify --name engine_verify
    python benchmarks/engine.py --variants ours_full,ours_noverify --rounds 1 --name engine_verify_full
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, peak_rss_mb, rss_mb, run_child, write_result  # noqa: E402


def build(name: str, size: int):
    from segprune.models import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=19)
    with torch.no_grad():  # distinct |gamma| as after training (a fresh model's all-ones gammas tie)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.0, 1.0)
    return model, torch.randn(1, 3, size, size)


def ours(model, x, verify=True) -> dict:
    import segprune

    result = segprune.prune(model, x, ratio=0.5, criterion="bn_scale", verify=verify)
    v = result.verification
    checked = {"verify_seconds": v.seconds, "verify_error": v.error, "verify_inputs": v.inputs} if v else {}
    return {"params_after": sum(p.numel() for p in result.model.parameters()), "groups": len(result.groups), **checked}


VARIANTS = {"ours": ours, "ours_noverify": lambda model, x: ours(model, x, verify=False),
            "ours_full": lambda model, x: ours(model, x, verify="full")}


def peer(model, x) -> dict:
    import torch_pruning as tp

    model.eval()  # the peer's usual setting; its trace keeps autograd on
    ignored = [model.head[-1]] + ([model.aux_head[-1]] if model.aux_head is not None else [])
    pruner = tp.pruner.BNScalePruner(model, x, importance=tp.importance.BNScaleImportance(), pruning_ratio=0.5,
                                     global_pruning=True, ignored_layers=ignored,
                                     output_transform=lambda out: out["out"])
    pruner.step()
    return {"params_after": sum(p.numel() for p in model.parameters()), "version": tp.__version__}


def one(which: str, name: str, size: int) -> dict:
    model, x = build(name, size)
    base = rss_mb()
    start = time.perf_counter()
    info = VARIANTS.get(which, peer)(model, x)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_extra_mb": peak_rss_mb() - base, **info}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--model", default="pspnet_resnet101")
    parser.add_argument("--variants", default="ours,peer",
                        help="comma-separated: ours, ours_noverify (verify=False), ours_full (verify='full'), peer")
    parser.add_argument("--name", default="engine", help="results/<name>.json")
    parser.add_argument("--one", choices=["ours", "ours_noverify", "ours_full", "peer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        import json

        print(json.dumps(one(args.one, args.model, args.size)))
        return
    runs = {w: [] for w in args.variants.split(",")}
    for _ in range(args.rounds):
        for which in runs:  # interleaved: ours, peer, ours, peer, ...
            runs[which].append(run_child(__file__, "--one", which, "--model", args.model, "--size", str(args.size)))
    summary = {w: {"median_seconds": statistics.median(r["seconds"] for r in rs),
                   "median_peak_extra_mb": statistics.median(r["peak_extra_mb"] for r in rs),
                   "params_after": rs[0]["params_after"], "runs": rs} for w, rs in runs.items()}
    if "peer" in summary:
        summary["ratio_time_ours_over_peer"] = summary["ours"]["median_seconds"] / summary["peer"]["median_seconds"]
        summary["ratio_memory_ours_over_peer"] = (summary["ours"]["median_peak_extra_mb"]
                                                  / summary["peer"]["median_peak_extra_mb"])
    for variant in ("ours", "ours_full"):  # what verify=True (a crop) or verify="full" adds to the time of prune
        if variant in summary and "ours_noverify" in summary:
            base = summary["ours_noverify"]["median_seconds"]
            summary[f"verify_overhead_{variant}"] = summary[variant]["median_seconds"] / base - 1
    write_result(args.name, {"benchmark": "engine", "model": args.model, "input": [1, 3, args.size, args.size],
                            "ratio": 0.5, "criterion": "bn_scale", "device": "cpu", "machine": machine(), **summary})


if __name__ == "__main__":
    main()
