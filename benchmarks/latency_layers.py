"""Where does a pruned model lose speed that its MACs promise? Per-convolution timing, unpruned vs pruned (#7).

benchmarks/latency.py measures whole models; this script splits one pair apart. Every convolution of the unpruned
model and of its pruning (global normalised L1 to ``--target`` of the MACs, fused, as latency.py builds them) is
timed alone on a random input of the shape it sees in the model, interleaved (unpruned layer, pruned layer, next
layer, ...; median of ``--rounds``), with the same threads. The rest of the model (pooling, upsampling, adds,
concatenations, ReLUs, copies) is the whole model's median latency minus its convolutions'.

Reported per layer: MACs before and after, time before and after, and the time the layer would take if it sped up
exactly with its MACs; the layers that lose most time against that are listed first. A layer whose time does not
follow its MACs is memory-bound or runs an inefficient kernel shape (narrow or odd channel counts); the rest
term does not shrink where pruning leaves the tensors it works on unchanged.

    python benchmarks/latency_layers.py [--model pspnet_resnet50] [--size 512 512] [--target 0.5] [--round-to 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_result  # noqa: E402

import segprune  # noqa: E402
from segprune.eval.profile import compare_latency, count_macs  # noqa: E402
from segprune.export.fuse import fuse_conv_bn  # noqa: E402
from segprune.models import create_model  # noqa: E402

CLASSES = {"pspnet_resnet50": 19, "segnet_vgg16_bn": 11}


def conv_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[nn.Conv2d, torch.Size, int]]:
    """Each convolution's module, input shape and MACs, by name, from one forward pass."""
    seen, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            def hook(m, args, out, name=name):
                k = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
                seen[name] = (m, args[0].shape, int(out.numel() * k))
            hooks.append(module.register_forward_hook(hook))
    with torch.inference_mode():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return seen


def time_layer(module: nn.Module, shape: torch.Size, runs: int) -> float:
    x = torch.randn(shape)
    with torch.inference_mode():
        module(x)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def layer_times(pair: dict[str, dict], rounds: int, runs: int) -> dict[str, dict[str, float]]:
    """Median over rounds of each layer's time, unpruned and pruned timed one after the other."""
    times = {name: {"unpruned": [], "pruned": []} for name in pair}
    for _ in range(rounds):
        for name, both in pair.items():
            for label in ("unpruned", "pruned"):
                module, shape, _ = both[label]
                times[name][label].append(time_layer(module, shape, runs))
    return {name: {label: statistics.median(v) for label, v in t.items()} for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pspnet_resnet50", choices=sorted(CLASSES))
    p.add_argument("--size", type=int, nargs=2, default=(512, 512))
    p.add_argument("--target", type=float, default=0.5, help="MACs left, fraction of the unpruned model's")
    p.add_argument("--round-to", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--top", type=int, default=12, help="layers listed in the Markdown table")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(1, 3, *args.size, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    kwargs = {"aux_head": False} if args.model.startswith("pspnet") else {}
    base = create_model(args.model, num_classes=CLASSES[args.model], **kwargs).eval()
    pruned = segprune.prune(base, x, target_macs=args.target, criterion="l1", round_to=args.round_to).model
    models = {"unpruned": fuse_conv_bn(base, x), "pruned": fuse_conv_bn(pruned.eval(), x)}
    convs = {label: conv_inputs(m, x) for label, m in models.items()}
    pair = {name: {label: convs[label][name] for label in models} for name in convs["unpruned"]}
    whole = compare_latency(models, x, rounds=args.rounds, runs=args.runs, warmup=1, threads=args.threads)
    per_layer = layer_times(pair, args.rounds, args.runs)
    rows = []
    for name, t in per_layer.items():
        macs = {label: pair[name][label][2] for label in models}
        ideal = t["unpruned"] * macs["pruned"] / macs["unpruned"]
        rows.append({"layer": name, "macs_before": macs["unpruned"], "macs_after": macs["pruned"],
                     "in_out_before": list(pair[name]["unpruned"][0].weight.shape[:2])[::-1],
                     "in_out_after": list(pair[name]["pruned"][0].weight.shape[:2])[::-1],
                     "ms_before": round(t["unpruned"], 3), "ms_after": round(t["pruned"], 3),
                     "ms_lost": round(t["pruned"] - ideal, 3)})
    rows.sort(key=lambda r: -r["ms_lost"])
    total = {label: whole[label]["median_ms"] for label in models}
    conv_sum = {label: sum(t[label] for t in per_layer.values()) for label in models}
    macs = {label: count_macs(models[label], x) for label in models}
    summary = {"model_ms": total, "conv_ms": conv_sum, "rest_ms": {k: total[k] - conv_sum[k] for k in models},
               "macs": macs, "mac_ratio": macs["unpruned"] / macs["pruned"],
               "speedup": total["unpruned"] / total["pruned"],
               "conv_speedup": conv_sum["unpruned"] / conv_sum["pruned"]}
    summary["efficiency"] = summary["speedup"] / summary["mac_ratio"]
    summary["conv_efficiency"] = summary["conv_speedup"] / summary["mac_ratio"]
    name = f"latency_layers_{args.model}_{int(100 * args.target)}" + (f"_r{args.round_to}" if args.round_to else "")
    data = {"benchmark": "latency_layers", "machine": machine(), "model": args.model, "size": args.size,
            "target_macs": args.target, "round_to": args.round_to, "threads": args.threads, "rounds": args.rounds,
            "runs": args.runs, "summary": summary, "layers": rows}
    write_result(name, data)
    (RESULTS / f"{name}.md").write_text(markdown(data, args.top))


def markdown(data: dict, top: int) -> str:
    s = data["summary"]
    lines = [f"# Per-layer latency: {data['model']} {data['size'][0]}×{data['size'][1]}, {data['target_macs']:.0%} of "
             f"the MACs (round_to {data['round_to']}), {data['threads']} threads ({data['machine']['cpu']})", "",
             "| | unpruned | pruned | speed-up | MAC ratio | speed-up / MAC ratio |", "|---|---:|---:|---:|---:|---:|",
             f"| whole model (ms) | {s['model_ms']['unpruned']:.1f} | {s['model_ms']['pruned']:.1f} | "
             f"{s['speedup']:.2f} | {s['mac_ratio']:.2f} | {s['efficiency']:.2f} |",
             f"| convolutions alone (ms) | {s['conv_ms']['unpruned']:.1f} | {s['conv_ms']['pruned']:.1f} | "
             f"{s['conv_speedup']:.2f} | | {s['conv_efficiency']:.2f} |",
             f"| the rest (ms) | {s['rest_ms']['unpruned']:.1f} | {s['rest_ms']['pruned']:.1f} | | | |", "",
             f"Layers losing most time against their MAC reduction (top {top}):", "",
             "| layer | in→out before | in→out after | GMACs before | GMACs after | ms before | ms after | ms lost |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in data["layers"][:top]:
        lines.append(f"| {r['layer']} | {r['in_out_before'][0]}→{r['in_out_before'][1]} | {r['in_out_after'][0]}→"
                     f"{r['in_out_after'][1]} | {r['macs_before'] / 1e9:.2f} | {r['macs_after'] / 1e9:.2f} | "
                     f"{r['ms_before']:.1f} | {r['ms_after']:.1f} | {r['ms_lost']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
