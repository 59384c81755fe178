"""Full-size parameter counts and MACs of the model zoo against the published figures (issue #3).

Models and inputs are built on the meta device, so nothing is allocated and nothing is computed:
``FlopCounterMode`` reads shapes only, which takes seconds for a 70 M-parameter model at 713×713. The meta counts
are first checked against a real CPU build of one full-width model at a small input. MACs = FLOPs / 2.

PSPNet's published figures (CAP's table, METHODS.md) fit an auxiliary head of 512 channels (the common "dsn" head:
3×3 conv 1024→512, BN, dropout, 1×1), counted in training mode with that head: that is what we compare, and each
row also records our default build (256-channel auxiliary head as in the released PSPNet; MACs in eval mode).

    python benchmarks/model_sizes.py      # prints JSON, writes benchmarks/results/model_sizes.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result  # noqa: E402

from segprune.eval.profile import count_macs, count_params  # noqa: E402
from segprune.models import create_model  # noqa: E402

# (model, num_classes, input H×W, published params, published MACs, builder kwargs); figures from METHODS.md.
PUBLISHED = [
    ("segnet_vgg16_bn", 11, (360, 480), 29.45e6, 106.7e9, {}),
    ("pspnet_resnet101", 19, (713, 713), 70.44e6, 556.04e9, {"aux_channels": 512}),
    ("pspnet_resnet50", 19, (713, 713), 51.45e6, 403.00e9, {"aux_channels": 512}),
]
TOLERANCE = 0.05


def build(name: str, num_classes: int, size: tuple[int, int], device: str, **kwargs):
    """The model and a 1×3×H×W input, both on ``device``."""
    with torch.device(device):
        torch.manual_seed(0)
        return create_model(name, num_classes=num_classes, **kwargs), torch.randn(1, 3, *size)


def train_macs(model, x) -> int:
    """MACs per image in training mode (auxiliary heads included), on a batch of two: training-mode BN needs more
    than one value per channel, which the 1×1 pyramid-pooling bin of one image does not have."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.train()(x.expand(2, -1, -1, -1))
    model.eval()
    return counter.get_total_flops() // 4


def meta_vs_cpu(name: str = "pspnet_resnet18", size: tuple[int, int] = (128, 128)) -> dict:
    """Counts of one full-width model on CPU and on meta, which must agree exactly."""
    counts = {}
    for device in ("cpu", "meta"):
        model, x = build(name, 19, size, device)
        counts[device] = {"params": count_params(model), "macs": count_macs(model, x)}
    if counts["cpu"] != counts["meta"]:
        raise AssertionError(f"meta and CPU counts differ: {counts}")
    return {"model": name, "input": [1, 3, *size], **counts, "agree": True}


def row(quantity: str, ours: int, published: float, **context) -> dict:
    rel = (ours - published) / published
    return {"quantity": quantity, "ours": ours, "published": published, "rel_diff": round(rel, 4),
            "within_5pct": abs(rel) <= TOLERANCE, **context}  # fmt: skip


def measure(name: str, num_classes: int, size: tuple[int, int], params: float, macs: float, kwargs: dict) -> dict:
    model, x = build(name, num_classes, size, "meta", **kwargs)
    if getattr(model, "aux_head", None) is None:
        return {"model": name, "num_classes": num_classes, "input": [1, 3, *size], "kwargs": kwargs,
                "params": row("params", count_params(model), params),
                "macs": row("macs", count_macs(model, x), macs)}  # fmt: skip
    default, _ = build(name, num_classes, size, "meta")
    n, n_default = count_params(model), count_params(default)
    return {
        "model": name, "num_classes": num_classes, "input": [1, 3, *size], "kwargs": kwargs,
        "macs_counted_in": "training mode, auxiliary head included",
        "params": row("params", n, params, default_build=n_default,
                      default_build_without_aux=n_default - count_params(default.aux_head)),
        "macs": row("macs", train_macs(model, x), macs, default_build_eval=count_macs(default, x)),
    }  # fmt: skip


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    start = time.perf_counter()
    check = meta_vs_cpu()
    rows = [measure(*entry) for entry in PUBLISHED]
    write_result("model_sizes", {
        "benchmark": "model_sizes",
        "method": "meta device; torch.utils.flop_counter.FlopCounterMode; MACs = FLOPs / 2; PSPNet with a "
                  "512-channel auxiliary head counted in training mode; published figures from METHODS.md",
        "machine": machine(),
        "meta_vs_cpu": check,
        "models": rows,
        "seconds": round(time.perf_counter() - start, 2),
    })  # fmt: skip


if __name__ == "__main__":
    main()
