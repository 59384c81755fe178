"""What `prune(compensate=True)` keeps before fine-tuning, on CamVid (#13).

A removed BN channel is zero in the masked model, but in the unpruned model it still emitted ReLU(BN(x)) — after
slimming mostly ReLU(beta), a constant its consumers depended on. `compensate=True` measures the mean a removed
channel emits (on the example inputs: real training images here) and folds it into the consumers' biases.

PSPNet-R18 x0.25 is trained with slimming (L1 on BN scales) on CamVid train at --size (cached under --cache), then
pruned by the global BN-scale threshold at each --ratios, with and without compensation, and evaluated on the test
split *before any fine-tuning*.

    python benchmarks/compensate_camvid.py [--epochs 20] [--ratios 0.3 0.5 0.7] [--examples 8]

Writes results/compensate_camvid.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from camvid_methods import train  # noqa: E402
from common import RESULTS, cache_trained, cached_curve, machine, write_result  # noqa: E402

import segprune  # noqa: E402
from segprune.eval.metrics import evaluate  # noqa: E402
from segprune.models import create_model  # noqa: E402
from segprune.workflows import Recipe  # noqa: E402
from segprune.workflows.data import semantic_loaders  # noqa: E402


def slimmed(args, recipe, train_loader, k):
    path = Path(args.cache) / f"slimming_{args.size[0]}x{args.size[1]}_e{args.epochs}_s{args.seed}"
    model = create_model("pspnet_resnet18", num_classes=k, width=0.25)
    if cached_curve(path, model) is not None:
        return model
    model = train(recipe, "slimming", train_loader, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    cache_trained(path, model, [])  # trained without validation: no curve
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"))
    p.add_argument("--size", type=int, nargs=2, default=(180, 240))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--ratios", type=float, nargs="+", default=(0.3, 0.5, 0.7), help="share of channels removed")
    p.add_argument("--examples", type=int, default=8, help="training images the means are measured on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default="/tmp/segprune_compensate_camvid")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    recipe = Recipe(name="compensate_camvid", model="pspnet_resnet18", width=0.25, data="camvid",
                    data_root=args.data, size=tuple(args.size), eval_size=tuple(args.size), val_split="test",
                    train_samples=0, val_samples=0, epochs=args.epochs, optimizer="adamw", lr=0.004, lam=5e-4,
                    seed=args.seed)
    train_loader, test_loader, k = semantic_loaders(recipe)
    start = time.perf_counter()
    model = slimmed(args, recipe, train_loader, k).eval()
    train_s = time.perf_counter() - start
    example = torch.cat([train_loader.dataset[i][0][None] for i in range(args.examples)])
    rows = [{"ratio": 0.0, "compensate": None, "miou": evaluate(model, test_loader, num_classes=k)["miou"]}]
    for ratio in args.ratios:
        for compensate in (False, True):
            result = segprune.prune(model, example, ratio=ratio, criterion="bn_scale", compensate=compensate)
            v = result.verification
            rows.append({"ratio": ratio, "compensate": compensate,
                         "miou": evaluate(result.model, test_loader, num_classes=k)["miou"],
                         "channels_removed": result.channels_removed, "compensated_layers": len(v.compensated),
                         "verify_error": v.error})
            print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "compensate_camvid", "machine": machine(),
              "dataset": "CamVid (SegNet release), test split resized to size; no fine-tuning after pruning",
              "budget": {"model": "pspnet_resnet18", "width": 0.25, "size": args.size, "epochs": args.epochs,
                         "training": "slimming (L1 on BN scales, lam 5e-4), AdamW lr 0.004", "seed": args.seed,
                         "criterion": "bn_scale (global)", "examples": args.examples},
              "train_seconds": round(train_s, 1), "rows": rows}
    write_result("compensate_camvid", result)
    (RESULTS / "compensate_camvid.md").write_text(markdown(result))


def markdown(result) -> str:
    rows = result["rows"]
    lines = [f"# compensate=True on CamVid, before fine-tuning ({result['budget']})", "",
             f"Unpruned test mIoU: {100 * rows[0]['miou']:.2f} %", "",
             "| channels removed | mIoU % dropped | mIoU % compensated | kept by compensating (points) |",
             "|---:|---:|---:|---:|"]
    for ratio in sorted({r["ratio"] for r in rows[1:]}):
        off, on = (next(r for r in rows if r["ratio"] == ratio and r["compensate"] is c) for c in (False, True))
        lines.append(f"| {ratio:.0%} | {100 * off['miou']:.2f} | {100 * on['miou']:.2f} | "
                     f"{100 * (on['miou'] - off['miou']):+.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
