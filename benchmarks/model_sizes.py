"""Full-size parameter counts and MACs of the model zoo against the published figures (issue #3).

Models and inputs are built on the meta device, so nothing is allocated and nothing is computed:
``FlopCounterMode`` reads shapes only, which takes seconds for a 70 M-parameter model at 713×713. The meta counts
are first checked against a real CPU build of one full-width model at a small input. MACs = FLOPs / 2, counted in
eval mode (no auxiliary head); parameters include the auxiliary head where the model has one.

    python benchmarks/model_sizes.py      # prints JSON, writes benchmarks/results/model_sizes.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result  # noqa: E402

from segprune.eval.profile import count_macs, count_params  # noqa: E402
from segprune.models import create_model  # noqa: E402

# (model, num_classes, input H×W, published params, published MACs), as quoted in issue #3.
PUBLISHED = [
    ("segnet_vgg16_bn", 11, (360, 480), 29.45e6, 106.7e9),
    ("pspnet_resnet101", 19, (713, 713), 70.4e6, 556e9),
    ("pspnet_resnet50", 19, (713, 713), 51.5e6, 403e9),
]
IMAGENET_FC = 2048 * 1000 + 1000  # ResNet's ImageNet classifier, which we do not have
TOLERANCE = 0.05


def build(name: str, num_classes: int, size: tuple[int, int], device: str):
    """The model and a 1×3×H×W input, both on ``device``."""
    with torch.device(device):
        torch.manual_seed(0)
        return create_model(name, num_classes=num_classes), torch.randn(1, 3, *size)


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


def measure(name: str, num_classes: int, size: tuple[int, int], params: float, macs: float) -> dict:
    model, x = build(name, num_classes, size, "meta")
    n = count_params(model)
    param_context, mac_context = {}, {}
    if getattr(model, "aux_head", None) is not None:
        aux = count_params(model.aux_head)
        param_context = {"ours_without_aux": n - aux, "ours_plus_imagenet_fc": n + IMAGENET_FC,
                         "rel_diff_plus_imagenet_fc": round((n + IMAGENET_FC - params) / params, 4)}  # fmt: skip
        with_aux = train_macs(model, x)
        mac_context = {"ours_train_mode_with_aux": with_aux, "rel_diff_with_aux": round((with_aux - macs) / macs, 4)}
    return {
        "model": name,
        "num_classes": num_classes,
        "input": [1, 3, *size],
        "params": row("params", n, params, **param_context),
        "macs": row("macs", count_macs(model, x), macs, **mac_context),
    }


def main() -> None:
    start = time.perf_counter()
    check = meta_vs_cpu()
    rows = [measure(*entry) for entry in PUBLISHED]
    write_result("model_sizes", {
        "benchmark": "model_sizes",
        "method": "meta device; torch.utils.flop_counter.FlopCounterMode; MACs = FLOPs / 2 in eval mode; "
                  "params include auxiliary heads; published figures as quoted in issue #3",
        "machine": machine(),
        "meta_vs_cpu": check,
        "models": rows,
        "seconds": round(time.perf_counter() - start, 2),
    })  # fmt: skip


if __name__ == "__main__":
    main()
