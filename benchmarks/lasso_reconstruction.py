"""He et al.'s LASSO channel selection + least-squares reconstruction against plain removal, layer by layer, on a
trained model: for every channel group that feeds one plain conv, remove half of its removable channels and
measure the consumer's output error (relative, on held-out synthetic scenes) for four choices:

  l1           the channels with the smallest L1 filter norm go, weights untouched (plain removal)
  l1+ls        the same channels, the consumer refitted by least squares
  lasso        the channels LASSO keeps, weights untouched
  lasso+ls     He et al.: LASSO choice and least-squares refit

Usage: python benchmarks/lasso_reconstruction.py RUN_DIR/pruned [--samples 4000] [--drop 0.5]
(a checkpoint folder trained on the demo's synthetic scenes; the committed result used the one of
`segprune demo --out RUN --set method=postprune --set threads=1`). Prints JSON and writes
benchmarks/results/lasso_reconstruction.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine  # noqa: E402

from segprune import checkpoint  # noqa: E402
from segprune.data.synthetic import SyntheticScenes  # noqa: E402
from segprune.prune import channel_groups  # noqa: E402
from segprune.prune.criteria import l1  # noqa: E402
from segprune.prune.lasso import consumer_of, least_squares, reconstruction_error, sample_layer, select_channels  # noqa: E402,E501


def batches(seed: int, n: int, size, classes: int) -> list:
    data = SyntheticScenes(num_samples=n, size=size, num_classes=classes, seed=seed, split="val")
    x, y = zip(*(data[i] for i in range(n)))
    return [(torch.stack(x), torch.stack(y))]


def layer_errors(model, group, consumer, fit, held_out, drop_fraction, samples) -> dict:
    index = next(m.index for m in group.members if m.module == consumer and m.role == "in")
    removable = group.prunable[index]
    drop = int(round(drop_fraction * removable.sum()))
    _, recon = select_channels(model, group, consumer, fit, drop=drop, samples=samples)
    fit_s, test = sample_layer(model, consumer, fit, samples=samples), sample_layer(model, consumer, held_out,
                                                                                   samples=samples, seed=1)
    w = model.get_submodule(consumer).weight.detach().double()
    score = l1(group, model)[index]
    order = [p for p in np.argsort(score) if removable[p]][:drop]
    l1_keep = np.setdiff1d(np.arange(len(index)), order)
    refit = least_squares(fit_s, l1_keep).reshape(w.shape[0], len(l1_keep), *w.shape[2:])
    return {"layer": consumer, "channels": int(len(index)), "dropped": drop,
            "l1": reconstruction_error(test, l1_keep, w[:, l1_keep]),
            "l1+ls": reconstruction_error(test, l1_keep, refit),
            "lasso": reconstruction_error(test, recon.positions, w[:, recon.positions]),
            "lasso+ls": reconstruction_error(test, recon.positions, recon.weight.double())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--drop", type=float, default=0.5)
    p.add_argument("--images", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = checkpoint.load(args.checkpoint).eval()
    config = checkpoint.load_config(args.checkpoint)
    recipe = config.get("recipe", {})
    size = tuple(recipe.get("size", (96, 128)))
    classes = config.get("model_kwargs", {}).get("num_classes", 6)
    fit, held_out = batches(11, args.images, size, classes), batches(12, args.images, size, classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = channel_groups(model, fit[0][0][:1])
    start, rows = time.perf_counter(), []
    for g in groups:
        consumer = None if g.frozen else consumer_of(g, model)
        if consumer is None or g.prunable.sum() < 4 or consumer.startswith("aux"):  # aux heads: train mode only
            continue
        rows.append(layer_errors(model, g, consumer, fit, held_out, args.drop, args.samples))
    summary = {k: float(np.mean([r[k] for r in rows])) for k in ("l1", "l1+ls", "lasso", "lasso+ls")}
    result = {"checkpoint": str(args.checkpoint), "drop": args.drop, "samples": args.samples, "layers": len(rows),
              "mean_relative_error": summary, "lasso+ls_beats_l1": sum(r["lasso+ls"] < r["l1"] for r in rows),
              "seconds": time.perf_counter() - start, "machine": machine(), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / "lasso_reconstruction.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(RESULTS / "lasso_reconstruction.json")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
