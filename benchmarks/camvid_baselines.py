"""Baselines on real CamVid: train SegNet, PSPNet-ResNet18 and U-Net at 240x320 crops, report test mIoU, training
time, training and evaluation images/s, and the data loader's throughput alone (goal: >= 2x the training step's).

    python benchmarks/camvid_baselines.py [--data ../shared/data/camvid] [--epochs 6]

On a CPU the budget (widths, epochs) is far below the papers' and is recorded in the results; on a GPU pass
--size 360 480 --widths 1 1 1 and more epochs. Writes results/camvid_baselines.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_result  # noqa: E402

from segprune.eval.metrics import evaluate  # noqa: E402
from segprune.models import create_model  # noqa: E402
from segprune.train.loop import fit  # noqa: E402
from segprune.workflows import Recipe  # noqa: E402
from segprune.workflows.data import semantic_loaders as loaders  # noqa: E402

MODELS = ("segnet_vgg16_bn", "pspnet_resnet18", "unet")


def loader_images_per_second(loader, batches: int = 20) -> float:
    """The loader alone: decode, augment, collate."""
    start, seen = time.perf_counter(), 0
    for i, (images, _) in enumerate(loader):
        seen += images.shape[0]
        if i + 1 == batches:
            break
    return seen / (time.perf_counter() - start)


def one(name: str, width: float, args, train_loader, val_loader, classes: int) -> dict:
    torch.manual_seed(0)
    model = create_model(name, num_classes=classes, width=width)
    start = time.perf_counter()
    fit(model, train_loader, epochs=args.epochs, lr=args.lr, optimizer="adamw", progress=False)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluate(model, val_loader, num_classes=classes)
    eval_seconds = time.perf_counter() - start
    n_train, n_val = len(train_loader) * train_loader.batch_size, len(val_loader.dataset)
    return {"model": name, "width": width, "params": sum(p.numel() for p in model.parameters()),
            "test_miou": metrics["miou"], "iou": metrics["iou"], "train_seconds": train_seconds,
            "train_images_per_s": n_train * args.epochs / train_seconds, "eval_images_per_s": n_val / eval_seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"))
    p.add_argument("--size", type=int, nargs=2, default=(240, 320))
    p.add_argument("--widths", type=float, nargs=3, default=(0.25, 0.25, 0.125), help="per model, in MODELS order")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=0.004)
    args = p.parse_args()
    torch.set_num_threads(2)
    recipe = Recipe(data="camvid", data_root=args.data, size=tuple(args.size), eval_size=tuple(args.size),
                    val_split="test", train_samples=0, val_samples=0, batch_size=8)
    train_loader, val_loader, classes = loaders(recipe)
    loader_rate = loader_images_per_second(train_loader)
    rows = []
    for name, width in zip(MODELS, args.widths):
        rows.append(one(name, width, args, train_loader, val_loader, classes))
        rows[-1]["loader_over_train"] = loader_rate / rows[-1]["train_images_per_s"]
        print(rows[-1], flush=True)
    result = {"benchmark": "camvid_baselines", "machine": machine(), "dataset": "CamVid (SegNet release)",
              "budget": {"size": args.size, "epochs": args.epochs, "optimizer": "adamw", "lr": args.lr,
                         "batch_size": 8, "eval": f"test split resized to {args.size}"},
              "loader_images_per_s": loader_rate, "rows": rows,
              "goal_loader_ge_2x_train": all(r["loader_over_train"] >= 2 for r in rows)}
    write_result("camvid_baselines", result)
    lines = ["| model | width | params | test mIoU % | train s | train img/s | eval img/s | loader / train |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['width']} | {r['params']:,} | {100 * r['test_miou']:.2f} | "
              f"{r['train_seconds']:.0f} | {r['train_images_per_s']:.1f} | {r['eval_images_per_s']:.1f} | "
              f"{r['loader_over_train']:.1f} |" for r in rows]
    (RESULTS / "camvid_baselines.md").write_text(f"# CamVid baselines ({result['budget']})\n\n" + "\n".join(lines)
                                                 + f"\n\nLoader alone: {loader_rate:.1f} images/s.\n")


if __name__ == "__main__":
    main()
