"""Every pruning method at equal MACs on real CamVid, with the same fine-tuning budget, against the peer library.

One model is trained three ways (plainly; with slimming's L1 on BN scales; with CAP's guided L1), then for each
MACs target every method prunes its starting model to that target (bisection on the global threshold), is
fine-tuned for the same number of epochs, and is evaluated on the CamVid test split. The peer
(torch-pruning's BN-scale and magnitude pruners with its own dependency graph) starts from the same plainly
trained model and is brought to the same MACs by bisection on its pruning ratio.

    python benchmarks/camvid_methods.py [--data ../shared/data/camvid] [--epochs 12] [--finetune-epochs 3]

Writes results/camvid_methods.{json,md} (and .png when matplotlib is installed), with the machine and budget.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_result  # noqa: E402

import segprune  # noqa: E402
from segprune.eval.metrics import evaluate  # noqa: E402
from segprune.eval.profile import count_macs, measure_latency, profile  # noqa: E402
from segprune.models import create_model  # noqa: E402
from segprune.train.loop import fit  # noqa: E402
from segprune.workflows import Recipe  # noqa: E402
from segprune.workflows.compress import Stages  # noqa: E402
from segprune.workflows.data import semantic_loaders as loaders  # noqa: E402
from segprune.workflows.methods import regularizer  # noqa: E402

OURS = ["slimming", "cap", "bn_scale", "l1", "fpgm", "taylor", "random"]
PEERS = ["peer_bn_scale", "peer_magnitude"]


def train(recipe: Recipe, method: str, train_loader, num_classes: int):
    torch.manual_seed(recipe.seed)
    model = create_model(recipe.model, num_classes=num_classes, width=recipe.width)
    r = _with(recipe, method=method)
    groups = segprune.channel_groups(model, torch.zeros(1, 3, *recipe.size))
    reg = regularizer(method, model, groups, lam=r.lam, warmup=r.warmup, cap_affinity=r.cap_affinity,
                      cap_weight=r.cap_weight, cap_temperature=r.cap_temperature)
    fit(model, train_loader, epochs=recipe.epochs, lr=recipe.lr, optimizer=recipe.optimizer, regularizer=reg,
        progress=False)
    if hasattr(reg, "remove"):
        reg.remove()
    return model


def _with(recipe: Recipe, **changes) -> Recipe:
    r = copy.copy(recipe)
    for key, value in changes.items():
        setattr(r, key, value)
    return r


def ours(recipe, method, start, example, target, train_loader):
    r = _with(recipe, method=method)
    crit = Stages(r, train_loader, example=example).criterion(start)
    return segprune.prune(start, example, target_macs=target, criterion=crit, seed=recipe.seed).model


def peer(kind, start, example, target):
    """torch-pruning brought to `target` MACs by bisection on its global pruning ratio."""
    import torch_pruning as tp

    base = count_macs(start, example)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(7):
        ratio = (lo + hi) / 2
        model = copy.deepcopy(start).eval()
        imp = tp.importance.BNScaleImportance() if kind == "peer_bn_scale" else tp.importance.MagnitudeImportance(p=1)
        cls = tp.pruner.BNScalePruner if kind == "peer_bn_scale" else tp.pruner.MagnitudePruner
        ignored = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == model.num_classes]
        cls(model, example, importance=imp, pruning_ratio=ratio, global_pruning=True, ignored_layers=ignored,
            output_transform=lambda out: out["out"]).step()
        if count_macs(model, example) <= target * base:
            hi, best = ratio, model
        else:
            lo = ratio
    # The peer traces eval mode only, so it leaves the train-only auxiliary heads (PSPNet's aux_head, ICNet's
    # cascade classifiers) unpruned and the model fails in training mode; they are dropped for the peer's
    # fine-tuning (they are not part of the deployed model anyway).
    if getattr(best, "aux_head", None) is not None:
        best.aux_head = None
    for module in best.modules():
        if type(module).__name__ == "CascadeFeatureFusion":
            module.classifier = None
    return best


def peer_equivalence(start, pruned, example) -> float:
    """Relative output error between the peer's pruned model and its masked model: `start` with the BN channels
    the peer removed zeroed (gamma = beta = 0). Kept channels are found by matching each pruned BN channel's
    (gamma, beta, mean, var) to the original's. ~1e-7 means the cut model is the masked one; a large value means
    the peer cut channels it did not account for (e.g. SegNet's pooling indices). Float32, eval mode."""
    from segprune.prune.oracle import outputs, relative_error

    masked = copy.deepcopy(start).eval()
    cut = dict(pruned.named_modules())
    with torch.no_grad():
        for name, bn in masked.named_modules():
            if not isinstance(bn, torch.nn.BatchNorm2d) or name not in cut or cut[name].num_features == bn.num_features:
                continue
            stats = lambda m: torch.stack([m.weight, m.bias, m.running_mean, m.running_var], 1)  # noqa: E731
            orig, kept = stats(bn), stats(cut[name])
            alive = (orig[:, None, :] == kept[None, :, :]).all(-1).any(1)
            bn.weight[~alive] = 0.0
            bn.bias[~alive] = 0.0
    return relative_error(outputs(masked, example), outputs(copy.deepcopy(pruned).eval(), example))


def row(name, model, val_loader, example, num_classes, seconds=None):
    metrics = evaluate(model, val_loader, num_classes=num_classes)
    lat = measure_latency(model, example, warmup=3, runs=15, threads=torch.get_num_threads())
    return {"method": name, "miou": metrics["miou"], **profile(model, example), "latency_ms": lat["median_ms"],
            "latency": lat, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"))
    p.add_argument("--model", default="pspnet_resnet18")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--size", type=int, nargs=2, default=(180, 240))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--targets", type=float, nargs="+", default=(0.5, 0.3), help="MACs left, fraction of unpruned")
    p.add_argument("--methods", nargs="+", default=OURS + PEERS)
    p.add_argument("--out", default="camvid_methods", help="results/<out>.{json,md,png}")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and random pruning")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for training and latency")
    p.add_argument("--cap-weight", default=Recipe.cap_weight, help="CAP's weight function (see CAPSparsity); "
                   "results from before 2026-11-23 13:30 UTC used inverse, then the default")
    p.add_argument("--cap-affinity", default=Recipe.cap_affinity, help="CAP's affinity (see CAPSparsity)")
    args = p.parse_args()
    recipe = Recipe(name="camvid_methods", model=args.model, width=args.width, data="camvid", data_root=args.data,
                    size=tuple(args.size), eval_size=tuple(args.size), val_split="test", train_samples=0,
                    val_samples=0, epochs=args.epochs, lr=0.004, lam=5e-4, finetune_lr=0.001, seed=args.seed,
                    cap_weight=args.cap_weight, cap_affinity=args.cap_affinity)
    torch.set_num_threads(args.threads)
    train_loader, val_loader, k = loaders(recipe)
    example = torch.zeros(1, 3, *recipe.size)
    t0 = time.perf_counter()
    trained = {"plain": train(recipe, "l1", train_loader, k)} if set(args.methods) - {"slimming", "cap"} else {}
    for m in ("slimming", "cap"):
        if m in args.methods:
            trained[m] = train(recipe, m, train_loader, k)
    rows = [row("unpruned", trained["plain"], val_loader, example, k, time.perf_counter() - t0)] if "plain" in trained \
        else []
    for target in args.targets:
        for method in args.methods:
            start = time.perf_counter()
            base = trained[method] if method in trained else trained["plain"]
            try:
                model = peer(method, base, example, target) if method in PEERS else \
                    ours(recipe, method, base, example, target, train_loader)
            except RuntimeError as err:  # the peer's SegNet does not run: its unpool indices lost their channels
                rows.append({"method": method, "target_macs": target, "error": f"{type(err).__name__}: {err}"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            extra = {"equivalence_error": peer_equivalence(base, model, example)} if method in PEERS else {}
            fit(model, train_loader, epochs=args.finetune_epochs, lr=recipe.finetune_lr, optimizer=recipe.optimizer,
                progress=False)
            rows.append({**row(method, model, val_loader, example, k, time.perf_counter() - start),
                         "target_macs": target, **extra})
            print(json.dumps({k2: v for k2, v in rows[-1].items() if k2 != "latency"}), flush=True)
            (RESULTS / f"{args.out}.partial.json").write_text(json.dumps(rows, indent=1))
    result = {"benchmark": "camvid_methods", "machine": machine(), "dataset": "CamVid (SegNet release), test split",
              "budget": {"model": args.model, "width": args.width, "size": args.size, "train_epochs": args.epochs,
                         "finetune_epochs": args.finetune_epochs, "optimizer": recipe.optimizer, "lr": recipe.lr,
                         "finetune_lr": recipe.finetune_lr, "lam": recipe.lam, "seed": recipe.seed,
                         "cap_weight": recipe.cap_weight, "cap_affinity": recipe.cap_affinity},
              "rows": rows, "goals": goals(rows, args.targets)}
    write_result(args.out, result)
    (RESULTS / f"{args.out}.md").write_text(markdown(result))
    plot(rows, RESULTS / f"{args.out}.png")
    (RESULTS / f"{args.out}.partial.json").unlink(missing_ok=True)


def goals(rows, targets) -> dict:
    unpruned = rows[0]["miou"] if rows and rows[0]["method"] == "unpruned" else float("nan")
    out = {}
    for t in targets:
        at = {r["method"]: r["miou"] for r in rows if r.get("target_macs") == t and "miou" in r}
        best_ours = max((v for m, v in at.items() if not m.startswith("peer")), default=None)
        best_peer = max((v for m, v in at.items() if m.startswith("peer")), default=None)
        out[str(t)] = {"cap_ge_slimming_ge_random": all(m in at for m in ("cap", "slimming", "random"))
                       and at["cap"] >= at["slimming"] >= at["random"],
                       "ours_best_ge_peer_best_plus_1": None if best_peer is None or best_ours is None
                       else 100 * (best_ours - best_peer) >= 1,
                       "within_1_of_unpruned": None if best_ours is None else 100 * (unpruned - best_ours) <= 1}
    return out


def markdown(result) -> str:
    lines = [f"# CamVid methods benchmark ({result['budget']})", "",
             "| MACs left | method | mIoU % | params | GMACs | latency ms | pruned = masked? |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['target_macs']} | {r['method']} | failed | | | | **no**: {r['error'][:120]} |")
            continue
        err = r.get("equivalence_error")
        eq = "" if err is None else f"{'yes' if err < 1e-4 else '**no**'} (rel. error {err:.1e})"
        lines.append(f"| {r.get('target_macs', 1.0)} | {r['method']} | {100 * r['miou']:.2f} | {r['params']:,} | "
                     f"{r['macs'] / 1e9:.3f} | {r['latency_ms']:.2f} | {eq} |")
    lines += ["", "Goals: " + json.dumps(result["goals"]), ""]
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [r for r in rows if "miou" in r]
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [(r["macs"] / 1e9, 100 * r["miou"]) for r in rows if r["method"] == method]
        ax.plot(*zip(*pts), marker="o", linestyle="-" if len(pts) > 1 else "", label=method)
    ax.set_xlabel("GMACs (one input)")
    ax.set_ylabel("mIoU % (CamVid test)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
