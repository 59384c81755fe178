"""CAP's training cost: step time of PSPNet-ResNet18 at 240x320 with CAP's guided sparsity vs. plain network
slimming (same model, same batches), interleaved step by step, median of several steps.

    python benchmarks/cap_overhead.py [--steps 8] [--batch 2]

Goal (issue #5): CAP adds at most 25 % to the step time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result  # noqa: E402


def main() -> None:
    import segprune
    from segprune.models import create_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--every", type=int, default=1, help="CAP guide update interval")
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 3, 240, 320), torch.randint(0, 11, (args.batch, 240, 320))
    runs = {}
    for name in ("slimming", "cap"):
        model = create_model("pspnet_resnet18", num_classes=11).train()
        cls = segprune.CAPSparsity if name == "cap" else segprune.BNSparsity
        kw = {"every": args.every} if name == "cap" else {}
        runs[name] = (model, cls(model, lam=1e-4, **kw), torch.optim.SGD(model.parameters(), lr=0.01), [])

    def step(model, reg, opt):
        opt.zero_grad()
        out = model(x)
        (F.cross_entropy(out["out"], y) + 0.4 * F.cross_entropy(out["aux"], y)).backward()
        reg(model)
        opt.step()

    for i in range(args.steps + 1):  # the first step of each is warm-up
        for model, reg, opt, times in runs.values():
            start = time.perf_counter()
            step(model, reg, opt)
            if i:
                times.append(time.perf_counter() - start)
    med = {name: statistics.median(r[3]) for name, r in runs.items()}
    write_result("cap_overhead", {"benchmark": "cap_overhead", "model": "pspnet_resnet18", "input": [args.batch, 3, 240,
                                  320], "every": args.every, "machine": machine(),
                                  "median_step_seconds": med, "steps": {n: r[3] for n, r in runs.items()},
                                  "overhead": med["cap"] / med["slimming"] - 1,
                                  "goal_overhead_le_25pct": med["cap"] / med["slimming"] - 1 <= 0.25})


if __name__ == "__main__":
    main()
