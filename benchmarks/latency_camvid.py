"""Accuracy at equal measured latency on CamVid (#14): latency allocation vs MAC allocation vs the peer's pruner.

One seed per run (initialisation, data order, fine-tuning all follow it):

1. PSPNet-R18 x0.25 is trained on CamVid train at --size for --epochs (AdamW, poly decay) with the validation
   split's mIoU recorded after every epoch (the curve, to show the plateau); cached under --cache, so a rerun
   skips training;
2. a :class:`segprune.LatencyTable` on --runtime (``eager``, ``onnxruntime``, ``openvino:fp32``, any registered
   runtime and precision) at --threads threads is measured for it (cached beside it);
3. three pruned models; ours (latency and MAC allocation) share one importance, --criterion: ``taylor`` (first-order
   loss change on 8 training batches, HALP's importance: importance per millisecond is only meaningful when the
   importance estimates the loss) or ``l1`` (filter norms, which do not compare across layers); the peer keeps its
   own magnitude importance:
   - ``latency``: ``prune(target_latency=--target, latency=table)``, with ``--closed-loop`` measured on the
     runtime and re-allocated until within 5 % of the target (:class:`segprune.eval.latency.LatencyMeter`);
   - ``macs``: ``prune(target_macs=m)``, one global threshold, with m chosen so that its *measured* latency matches
     the latency model's (the table's guess first, then secant steps on interleaved measurements);
   - ``peer``: torch-pruning's MagnitudePruner (L1, global), its pruning ratio bisected on measured latency;
4. the train-only auxiliary head is dropped from all three (the peer leaves it unpruned), each is fine-tuned for
   --finetune-epochs with the same learning rate, and evaluated on the CamVid test split;
5. latency: all three and the unpruned model fused, deployed on --runtime (outputs checked against eager) and timed
   interleaved, --rounds rounds, median. Every latency in a run (table, matching, final timing) is on --runtime.

    python benchmarks/latency_camvid.py --seed 1 [--criterion taylor] [--runtime openvino:fp32 --closed-loop]
    python benchmarks/latency_camvid.py --summarise results/latency_camvid_taylor_seed1.json ...

With --rescore N both of our allocations are reached in N steps, re-scored before each on the model masked by the
step before (``prune(rescore=N)``): one-shot Taylor scores miss that a layer's last channels matter more.

A run writes results/latency_camvid_<criterion>[_<runtime>][_t<target>][_r<N>]_seed<N>.json (no runtime part for
eager, no target part for 0.5, no r part for one shot); --summarise writes the same name without the seed
(.json, .md: mean and standard error over seeds, paired differences) and puts its rows into
results/latency_aware.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import latency_aware  # noqa: E402
from common import RESULTS, cache_trained, cached_curve, machine, write_result  # noqa: E402

import segprune  # noqa: E402
from segprune._utils import IGNORE_INDEX  # noqa: E402
from segprune.eval.latency import LatencyMeter, RuntimeTimer, measure_latency_table  # noqa: E402
from segprune.eval.metrics import evaluate  # noqa: E402
from segprune.eval.profile import count_macs  # noqa: E402
from segprune.export.fuse import fuse_conv_bn  # noqa: E402
from segprune.export.runtimes import parse, spec_type  # noqa: E402
from segprune.models import create_model  # noqa: E402
from segprune.prune import Taylor  # noqa: E402
from segprune.train.loop import fit  # noqa: E402
from segprune.workflows import Recipe  # noqa: E402
from segprune.workflows.data import semantic_loaders  # noqa: E402

ALLOCATIONS = ("latency", "macs", "peer")
MATCH = 0.02  # the MAC and peer models are accepted within 2 % of the latency model's measured latency


def recipe_for(args, split: str) -> Recipe:
    return Recipe(name="latency_camvid", model="pspnet_resnet18", width=0.25, data="camvid", data_root=args.data,
                  size=tuple(args.size), eval_size=tuple(args.size), val_split=split, train_samples=0,
                  val_samples=0, epochs=args.epochs, optimizer="adamw", lr=args.lr, seed=args.seed)


def trained(args, train_loader, val_loader, k) -> tuple[torch.nn.Module, list[float]]:
    """The unpruned model and its validation curve, from the cache when this exact budget was trained before."""
    path = Path(args.cache) / f"pspnet_r18_x025_{args.size[0]}x{args.size[1]}_e{args.epochs}_lr{args.lr}_s{args.seed}"
    torch.manual_seed(args.seed)
    model = create_model("pspnet_resnet18", num_classes=k, width=0.25)
    if (cached := cached_curve(path, model)) is not None:
        return model, cached
    curve: list[float] = []

    def validate(m):
        curve.append(evaluate(m, val_loader, num_classes=k)["miou"])
        print(f"seed {args.seed} epoch {len(curve)}: val mIoU {curve[-1]:.4f}", flush=True)
        return curve[-1]

    fit(model, train_loader, epochs=args.epochs, lr=args.lr, optimizer="adamw", validate=validate, progress=False)
    cache_trained(path, model, curve)
    return model, curve


RUNTIME = "eager"  # set by main() from --runtime: every latency of a run is measured on it


def timed(models: dict, x, threads: int, rounds: int) -> dict:
    fused = {label: fuse_conv_bn(copy.deepcopy(m).eval(), x) for label, m in models.items()}
    return RuntimeTimer(RUNTIME, threads).time_models(fused, x, rounds)


def tag(runtime: str) -> str:
    """The file-name part of a runtime spec: '' for eager (the first runs' names), else '_openvino_fp32'."""
    return "" if runtime == "eager" else "_" + runtime.replace(":", "_")


def latency_of(model, reference, x, threads, rounds=7) -> float:
    """`model`'s measured latency as a fraction of `reference`'s (interleaved; the minima: the timing least
    disturbed by other processes on a shared machine)."""
    t = timed({"m": model, "ref": reference}, x, threads, rounds)
    return t["m"]["min_ms"] / t["ref"]["min_ms"]


def match(make, lo: float, hi: float, reference, x, threads, log: list) -> tuple[torch.nn.Module, float]:
    """Bisect `make(p)`'s knob p in [lo, hi] (latency falls as p rises) until its measured latency is within MATCH
    of `reference`'s; returns the closest model and its p."""
    best = None
    for _ in range(8):
        p = (lo + hi) / 2
        model = make(p)
        r = latency_of(model, reference, x, threads)
        log.append({"knob": round(p, 4), "latency_vs_latency_model": round(r, 4)})
        if best is None or abs(r - 1) < abs(best[2] - 1):
            best = (model, p, r)
        if abs(r - 1) <= MATCH:
            break
        lo, hi = (p, hi) if r > 1 else (lo, p)
    return best[0], best[1]


def peer_prune(start, x, ratio: float) -> torch.nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(start).eval()
    ignored = [model.head[-1]] + ([model.aux_head] if model.aux_head is not None else [])
    tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
                              global_pruning=True, ignored_layers=ignored,
                              output_transform=lambda out: out["out"]).step()
    return model


def importance(name: str, base, train_loader):
    if name != "taylor":
        return name
    batches = [b for _, b in zip(range(8), train_loader)]
    return Taylor(base, batches, lambda out, y: F.cross_entropy(out["out"], y, ignore_index=IGNORE_INDEX))


def pruned_models(base, x, table, args, train_loader) -> tuple[dict, dict]:
    """allocation -> pruned model, and how the MAC and peer models were matched to the latency model."""
    groups, score = segprune.channel_groups(base, x), importance(args.criterion, base, train_loader)
    ours = lambda **kw: segprune.prune(base, x, criterion=score, groups=groups, rescore=args.rescore,  # noqa: E731
                                       **kw).model
    meter = LatencyMeter(base, x, args.runtime, threads=args.threads) if args.closed_loop else None
    result = segprune.prune(base, x, criterion=score, groups=groups, target_latency=args.target, latency=table,
                            measure=meter, rescore=args.rescore)
    lat, closed = result.model, result.latency
    logs = {"macs": [], "peer": []}
    # MAC allocation: higher MAC target = slower, so the knob is 1 - target_macs
    macs, knob = match(lambda p: ours(target_macs=1 - p), 0.0, 0.95, lat, x, args.threads, logs["macs"])
    peer, ratio = match(lambda p: peer_prune(base, x, p), 0.0, 0.9, lat, x, args.threads, logs["peer"])
    models = {"latency": lat, "macs": macs, "peer": peer}
    # the table's guess for each at their equal measured latency: where it errs, and for which allocation
    predicted = {alloc: round(table.ratio_of(m), 4) for alloc, m in models.items()}
    return models, {"macs_target": round(1 - knob, 4), "peer_ratio": round(ratio, 4), "search": logs,
                    "closed_loop": closed, "predicted_latency_ratio": predicted}


def run(args) -> dict:
    torch.set_num_threads(args.train_threads)
    train_loader, val_loader, k = semantic_loaders(recipe_for(args, "val"))
    _, test_loader, _ = semantic_loaders(recipe_for(args, "test"))
    x = torch.zeros(1, 3, *args.size)
    t0 = time.perf_counter()
    base, curve = trained(args, train_loader, val_loader, k)
    if args.train_only:
        return None
    base.eval()
    train_s = time.perf_counter() - t0
    table_path = Path(args.cache) / f"table_s{args.seed}_e{args.epochs}_t{args.threads}{tag(args.runtime)}.json"
    runtime, precision = parse(args.runtime)
    table = (segprune.LatencyTable.load(table_path, runtime=runtime.name, precision=precision, threads=args.threads,
                                        input=x.shape, model=base)
             if table_path.exists() else measure_latency_table(base, x, runtime=args.runtime, threads=args.threads,
                                                               name="pspnet_r18_x025"))
    table.save(table_path)
    models, matching = pruned_models(base, x, table, args, train_loader)
    rows = [{"allocation": "unpruned", "miou": evaluate(base, test_loader, num_classes=k)["miou"]}]
    for alloc, model in models.items():
        model.aux_head = None  # train-only; the peer leaves it unpruned, so every variant is fine-tuned without it
        torch.manual_seed(args.seed)
        fit(model, train_loader, epochs=args.finetune_epochs, lr=args.finetune_lr, optimizer="adamw", progress=False)
        rows.append({"allocation": alloc, "miou": evaluate(model, test_loader, num_classes=k)["miou"],
                     "macs_ratio": count_macs(model, x) / count_macs(base, x),
                     "params_ratio": sum(p.numel() for p in model.parameters())
                     / sum(p.numel() for n, p in base.named_parameters() if not n.startswith("aux_head"))})
        print(json.dumps(rows[-1]), flush=True)
    t = timed({"unpruned": base, **models}, x, args.threads, args.rounds)
    for row in rows:
        lat = t[row["allocation"]]
        row.update(median_ms=round(lat["median_ms"], 3), min_ms=round(lat["min_ms"], 3),
                   spread=round(lat["spread"], 3),
                   latency_ratio=round(lat["median_ms"] / t["unpruned"]["median_ms"], 4),
                   latency_ratio_min=round(lat["min_ms"] / t["unpruned"]["min_ms"], 4))
    return {"benchmark": "latency_camvid", "machine": machine(), "dataset": "CamVid (SegNet release): train, val "
            "curve, test split for mIoU, all resized to size",
            "budget": {"model": "pspnet_resnet18", "width": 0.25, "size": args.size, "epochs": args.epochs,
                       "lr": args.lr, "finetune_epochs": args.finetune_epochs, "finetune_lr": args.finetune_lr,
                       "optimizer": "adamw", "seed": args.seed, "target_latency": args.target,
                       "runtime": args.runtime, "threads": args.threads, "rounds": args.rounds,
                       "criterion": args.criterion, **({"closed_loop": True} if args.closed_loop else {}),
                       **({"rescore": args.rescore} if args.rescore > 1 else {})},
            "train_seconds": round(train_s, 1), "val_curve": [round(v, 4) for v in curve],
            "matching": matching, "rows": rows}


def mean_se(values: list[float]) -> tuple[float, float]:
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return statistics.mean(values), se


def summarise(paths: list[Path]) -> dict:
    runs = [json.loads(p.read_text()) for p in paths]
    budgets = {json.dumps({k: v for k, v in r["budget"].items() if k != "seed"}, sort_keys=True) for r in runs}
    if len(budgets) > 1:
        raise SystemExit(f"the runs differ in more than their seed: {sorted(budgets)}")
    by = {a: [next(row for row in r["rows"] if row["allocation"] == a) for r in runs]
          for a in ("unpruned", *ALLOCATIONS)}
    table = []
    for alloc, rows in by.items():
        miou, se = mean_se([100 * r["miou"] for r in rows])
        lat, lat_se = mean_se([r["latency_ratio"] for r in rows])
        table.append({"allocation": alloc, "miou_mean": round(miou, 2), "miou_se": round(se, 2),
                      "per_seed": [round(100 * r["miou"], 2) for r in rows], "latency_ratio": round(lat, 4),
                      "latency_ratio_se": round(lat_se, 4),
                      "macs_ratio": round(statistics.mean(r.get("macs_ratio", 1.0) for r in rows), 4)})
    diffs = {}
    for other in ("macs", "peer"):
        d = [100 * (a["miou"] - b["miou"]) for a, b in zip(by["latency"], by[other])]
        m, se = mean_se(d)
        diffs[f"latency - {other}"] = {"mean": round(m, 2), "se": round(se, 2), "per_seed": [round(v, 2) for v in d],
                                       "goal_+1_met": m >= 1.0}
    curves = [r["val_curve"] for r in runs]
    return {"benchmark": "latency_camvid", "sources": [str(p) for p in paths], "machine": runs[0]["machine"],
            "budget": {**runs[0]["budget"], "seed":
            [r["budget"]["seed"] for r in runs]}, "rows": table, "paired": diffs, "val_curves": curves,
            "plateau": [{"seed": r["budget"]["seed"], "best_val": max(c), "last5_gain": round(max(c[-5:]) -
                         max(c[:-5]), 4) if len(c) > 5 else None} for r, c in zip(runs, curves)]}


def markdown(s: dict) -> str:
    b = s["budget"]
    lines = [f"# CamVid accuracy at equal measured latency (seeds {b['seed']})", "",
             f"PSPNet-R18 x{b['width']} at {b['size'][0]}x{b['size'][1]}, trained {b['epochs']} epochs (AdamW, lr "
             f"{b['lr']}), pruned to {b['target_latency']} of its {b['runtime']} latency ({b['threads']} thread; our "
             f"importance: {b['criterion']}), fine-tuned "
             f"{b['finetune_epochs']} epochs (lr {b['finetune_lr']}); test split mIoU, mean ± s.e. over seeds"
             + ("; the latency allocation closed-loop (measured and re-allocated)." if b.get("closed_loop") else "."),
             "",
             "| allocation | test mIoU % | s.e. | per seed | latency ratio | MACs ratio |",
             "|---|---:|---:|---|---:|---:|"]
    lines += [f"| {r['allocation']} | {r['miou_mean']:.2f} | {r['miou_se']:.2f} | {', '.join(map(str, r['per_seed']))}"
              f" | {r['latency_ratio']:.3f} | {r['macs_ratio']:.3f} |" for r in s["rows"]]
    lines += ["", "| paired difference | mIoU points | s.e. | per seed | goal ≥ +1 |", "|---|---:|---:|---|---|"]
    lines += [f"| {k} | {v['mean']:+.2f} | {v['se']:.2f} | {', '.join(map(str, v['per_seed']))} | "
              f"{'met' if v['goal_+1_met'] else 'not met'} |" for k, v in s["paired"].items()]
    lines += ["", "Validation plateau (best val mIoU; gain of the last 5 epochs over all before):"]
    lines += [f"- seed {p['seed']}: best {p['best_val']:.4f}, last-5 gain {p['last5_gain']}" for p in s["plateau"]]
    return "\n".join(lines) + "\n"


def target_tag(target: float) -> str:
    """The results' name part of a latency target other than the default 0.5 (``_t0.3``)."""
    return "" if target == 0.5 else f"_t{target}"


def variant(budget: dict) -> str:
    """The results' name of a run's settings: criterion, runtime, target, re-scoring steps
    (``taylor_openvino_fp32_t0.3_r6``)."""
    rescore = budget.get("rescore", 1)
    return (f"{budget['criterion']}{tag(budget['runtime'])}{target_tag(budget['target_latency'])}"
            + (f"_r{rescore}" if rescore > 1 else ""))


def into_latency_aware(s: dict) -> None:
    """Replace the CamVid rows of results/latency_aware.json with these (its schema: model, runtime, allocation,
    target, latency_ratio, macs_ratio, miou)."""
    path = RESULTS / "latency_aware.json"
    data = json.loads(path.read_text())
    rescore = s["budget"].get("rescore", 1)
    model = (f"pspnet_resnet18_x0.25 camvid {s['budget']['size'][0]}x{s['budget']['size'][1]} "
             f"({s['budget']['criterion']}{f', re-scored in {rescore} steps' if rescore > 1 else ''})")
    runtime = s["budget"]["runtime"]
    target = s["budget"]["target_latency"]
    data["rows"] = [r for r in data["rows"] if (r["model"], r["runtime"], r["target"]) != (model, runtime, target)]
    data["rows"] += [{"model": model, "runtime": runtime, "allocation": r["allocation"] if r["allocation"] != "unpruned"
                      else "none", "target": s["budget"]["target_latency"], "latency_ratio": r["latency_ratio"],
                      "macs_ratio": r["macs_ratio"], "miou": round(r["miou_mean"] / 100, 4),
                      "miou_se": round(r["miou_se"] / 100, 4), "seeds": s["budget"]["seed"]} for r in s["rows"]]
    data.setdefault("camvid_paired", {})[variant(s["budget"])] = s["paired"]
    command = "python benchmarks/latency_camvid.py --summarise " + " ".join(str(p) for p in s["sources"])
    data["commands"] = [c for c in data["commands"] if c != command] + [command]
    write_result("latency_aware", data)
    (RESULTS / "latency_aware.md").write_text(latency_aware.markdown(data))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--size", type=int, nargs=2, default=(180, 240))
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=0.004)
    p.add_argument("--finetune-epochs", type=int, default=8)
    p.add_argument("--finetune-lr", type=float, default=0.001)
    p.add_argument("--target", type=float, default=0.5, help="latency left, fraction of the unpruned model's")
    p.add_argument("--threads", type=int, default=1, help="threads of the latency measurements")
    p.add_argument("--train-threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--cache", default="/tmp/segprune_latency_camvid", help="trained models and tables")
    p.add_argument("--criterion", choices=["taylor", "l1"], default="taylor", help="importance of our allocations")
    p.add_argument("--runtime", type=spec_type, default="eager", help="where every latency is measured: "
                   "a registered runtime, optionally with a precision (openvino:fp32)")
    p.add_argument("--closed-loop", action="store_true", help="measure the latency allocation on --runtime and "
                   "re-allocate until within 5 %% of --target")
    p.add_argument("--rescore", type=int, default=1, help="our allocations in this many steps, re-scored on the "
                   "model masked by the step before (prune(rescore=)); 1: one shot")
    p.add_argument("--train-only", action="store_true", help="train (into --cache) and stop")
    p.add_argument("--summarise", nargs="+", type=Path, help="seed results to combine")
    args = p.parse_args()
    if args.summarise:
        s = summarise(args.summarise)
        name = f"latency_camvid_{variant(s['budget'])}"
        write_result(name, s)
        (RESULTS / f"{name}.md").write_text(markdown(s))
        into_latency_aware(s)
        return
    global RUNTIME
    RUNTIME = args.runtime
    result = run(args)
    if result is not None:
        write_result(f"latency_camvid_{variant(result['budget'])}_seed{args.seed}", result)


if __name__ == "__main__":
    main()
