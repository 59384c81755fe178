"""The seed's measurements for YOLACT (issue #8): BN-scale channel pruning of the backbone + Conv–BN fusion.

The seed (Ning et al. 2023; METHODS.md section 1) reports, on COCO val2017 against the original YOLACT: model file
−56.9 %, speed +28.6 %, GPU memory at run time −13.6 %. This script measures the same quantities on segprune's
YOLACT, and goes one step beyond the seed (FPN, protonet and head channels too).

(a) Cost, YOLACT-ResNet50 at 550×550, 80 classes, batch 1. No trained weights can be downloaded here, so the model is
    built with random weights (seed 0). The BN scales γ are then drawn uniformly from [0, 1) (seeded): with the
    constructor's γ = 1 every channel would tie and the global threshold would empty the first layers in model order.
    Random γ make the global threshold remove about the same share of every layer; a sparsity-trained network would
    concentrate the cuts unevenly, so the per-layer widths (not the channel count) differ from the seed's.
    Variants, each measured as deployed (the training-only semantic head dropped):
      - ``unpruned``: the original model, BN unfused (the seed's baseline);
      - ``fused``: unpruned, Conv–BN fused (what fusion alone gives);
      - ``seed``: one global |γ| threshold removing ``--ratio`` (default 50 %) of the backbone's prunable channels
        (only the backbone has BN; per-layer floor 10 %), traced with ``model.prune_inputs`` so prototypes and
        coefficients stay coupled, then fused;
      - ``beyond``: ``seed`` and then the same share of every FPN, protonet and head channel group (no BN there:
        normalised L1 filter norm, the same fraction in each group, floor 10 %; prototypes and mask coefficients
        pruned together), then fused.
    Figures: params, MACs (FLOPs / 2, torch.utils.flop_counter), weight file (safetensors bytes of the state dict),
    CPU latency (eager, ``--threads`` threads, interleaved rounds, median of per-round medians; eval/profile.py
    compare_latency) and fps = 1000 / latency, and peak inference memory on the CPU, two ways: (1) peak tensor
    memory: weights, input and every intermediate tensor alive at once during one inference, tracked op by op with
    a TorchDispatchMode (what ``torch.cuda.max_memory_allocated`` counts on a GPU; exact and independent of the
    allocator and of other processes) — the goal is judged on this; (2) peak RSS growth: each variant rebuilt in a
    fresh process (meta device, allocated once), run once at 64×64 (kernel set-up), then the bytes of its weights +
    the VmHWM growth (reset through /proc/self/clear_refs) over two inferences at full size.
    CUDA latency and ``torch.cuda.max_memory_allocated`` are measured when a GPU is present, else recorded null.

(b) Accuracy at small scale: a small YOLACT (``test_yolact`` with ``width=0.125, backbone_width=0.125``: a narrow
    ResNet backbone with 8..256 channels, FPN/protonet/head 32 wide, 8 prototypes; about 0.34 M parameters) is
    trained from scratch with AdamW and the slimming penalty (λ·sign(γ) on the backbone's BN scales) on (1) the
    embedded synthetic instances at 96×96 (160 training, 48 validation scenes; ``--epochs``) and (2) the fruits set
    (../shared/data/fruits_nuts_coco, 18 photos and no split given: a fixed seeded split of 12 training / 6
    validation images, resized to 160×160; ``--fruits-epoch-scale`` times as many epochs, since an epoch is 3
    steps). Then it is pruned as ``seed`` and as ``beyond``, fine-tuned ``--finetune-epochs`` (lr / 3), fused and
    evaluated: COCOeval box and mask AP, AP50, AP75 on the validation images. ``control``: the unpruned model trained
    for the same extra epochs (no sparsity), so the pruned models' AP is also compared with a model that had the same
    training. The 1-point mask AP goal is judged against ``unpruned`` only when its mask AP is at least 5 %.

    python benchmarks/yolact.py [--quick] [--threads 2] [--rounds 5] [--ratio 0.5] [--skip-accuracy]
    # writes benchmarks/results/yolact.json and yolact.md (yolact_quick.* with --quick)
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import re
import sys
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, run_child, write_result  # noqa: E402

from segprune.eval.instances import evaluate_model  # noqa: E402
from segprune.eval.profile import compare_latency, profile  # noqa: E402
from segprune.export.fuse import fuse_conv_bn  # noqa: E402
from segprune.models import create_model  # noqa: E402
from segprune.prune import channel_groups, prune  # noqa: E402
from segprune.prune.criteria import bn_scale, l1  # noqa: E402
from segprune.prune.plan import Plan  # noqa: E402
from segprune.workflows.tasks import ap_row  # noqa: E402

GOALS = {"size_change_pct": -56.9, "speed_change_pct": 28.6, "memory_change_pct": -13.6, "mask_ap_drop_points": 1.0}
FRUITS = Path(os.environ.get("SEGPRUNE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / \
    "fruits_nuts_coco"
VARIANTS = ("unpruned", "fused", "seed", "beyond")
MIN_AP = 0.05  # below this unpruned mask AP the 1-point goal is not judged (met: null)


# --- building and compressing ---------------------------------------------------------------------------------
def randomize_gammas(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN scales drawn from U[0, 1) (seeded), so that a |γ| threshold has something to rank."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g))
    return model


def measure_instances(model: nn.Module, val, x: torch.Tensor) -> dict:
    """Box and mask AP on `val` and the static cost of the deployable model on `x` (as `segprune run` measures)."""
    metrics = evaluate_model(model, val, batch_size=8)
    return {**ap_row(metrics), "coco": metrics, **profile(deployable(model), x)}


def deployable(model: nn.Module) -> nn.Module:
    """A copy without the training-only semantic head, in eval mode."""
    out = copy.deepcopy(model)
    out.seg_head = None
    return out.eval()


def non_bn_l1(group, model):
    """Normalised L1 filter norm of the groups without BN (FPN, protonet, head); None for the BN-scored ones."""
    return None if bn_scale(group, model) is not None else l1(group, model)


def compress(model: nn.Module, x: torch.Tensor, scope: str, *, ratio: float, min_keep: float = 0.1):
    """(pruned model, plan, {what was removed}) for scope ``seed`` (backbone by |γ|) or ``beyond`` (+ the rest)."""
    groups = channel_groups(model, model.prune_inputs(x))
    first = prune(model.eval(), model.prune_inputs(x), criterion="bn_scale", ratio=ratio, min_keep=min_keep,
                  groups=groups)
    info = {"backbone_removed": first.channels_removed, "backbone_prunable": first.channels_prunable}
    if scope == "seed":
        return first.model, first.plan, info
    second = prune(first.model.eval(), first.model.prune_inputs(x), criterion=non_bn_l1, select="uniform",
                   ratio=ratio, min_keep=min_keep)
    rest = [g for g in second.groups if not g.frozen and non_bn_l1(g, first.model) is not None]
    info.update(rest_removed=second.channels_removed, rest_prunable=sum(int(g.prunable.sum()) for g in rest))
    return second.model, first.plan.then(second.plan), info


# --- (a) cost at 550 ----------------------------------------------------------------------------------------------
def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def child_memory(spec: dict) -> dict:
    """In a fresh process: build a variant, then peak RSS of `runs` inferences (see the module docstring)."""
    torch.set_num_threads(spec["threads"])
    x = torch.randn(1, 3, spec["size"], spec["size"], generator=torch.Generator().manual_seed(0))
    gc.collect()
    start = _rss_mb()
    with torch.device("meta"):  # built, pruned and fused without memory, then allocated once: no freed holes
        model = create_model("yolact_resnet50", num_classes=80)
    if spec.get("plan"):
        Plan.load(spec["plan"]).apply(model)
    model = deployable(model)
    if spec["fuse"]:
        model = fuse_conv_bn(model, torch.zeros(x.shape, device="meta"))
    model = _allocate(model.to_empty(device="cpu"))
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    with torch.inference_mode():  # kernels' one-time set-up, outside the measured peak
        model(torch.zeros(1, 3, 64, 64))
    gc.collect()
    _malloc_trim()
    loaded = _rss_mb()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False  # VmHWM then includes building the model: an upper bound
    with torch.inference_mode():
        for _ in range(spec["runs"]):
            model(x)
    peak = _hwm_mb()
    return {"peak_mb": weights + peak - loaded, "weights_mb": weights, "activations_mb": peak - loaded,
            "process_rss_growth_mb": peak - start, "hwm_reset": reset}


@torch.no_grad()
def _allocate(model: nn.Module) -> nn.Module:
    """Values for a model materialised by ``to_empty``: small random weights, BN statistics (0, 1)."""
    for p in model.parameters():
        p.normal_(0, 0.01)
    for name, b in model.named_buffers():
        b.fill_(1 if name.endswith("running_var") else 0)
    return model


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive, from every op's outputs (views and in-place results share a storage),
    freed when the last tensor on a storage is collected: the CPU analogue of ``torch.cuda.max_memory_allocated``."""

    def __init__(self, base: int):
        super().__init__()
        self.now = self.peak = base
        self.refs: dict[int, list[int]] = {}  # storage pointer -> [bytes, live tensors]

    def _release(self, ptr: int) -> None:
        entry = self.refs[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr not in self.refs:
                    self.refs[ptr] = [storage.nbytes(), 0]
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                self.refs[ptr][1] += 1
                weakref.finalize(t, self._release, ptr)
        return out


def peak_tensor_mb(model: nn.Module, x: torch.Tensor) -> dict:
    """Peak bytes of live tensors in one inference: weights, buffers and the input, plus every tensor the forward
    makes while it is alive (exact, independent of the allocator and of other processes)."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    with torch.inference_mode():
        tracker = _LiveTensorBytes(weights + x.numel() * x.element_size())
        with tracker:
            out = model(x)
        del out
    return {"peak_mb": tracker.peak / 2**20, "weights_mb": weights / 2**20,
            "activations_mb": (tracker.peak - weights) / 2**20}


def cuda_figures(models: dict[str, nn.Module], size: int, rounds: int) -> dict | None:
    """CUDA latency and peak allocated memory per variant, or None without a GPU."""
    if not torch.cuda.is_available():
        return None
    x = torch.randn(1, 3, size, size, device="cuda")
    on_gpu = {name: m.cuda() for name, m in models.items()}
    latency = compare_latency(on_gpu, x, rounds=rounds, runs=20, warmup=10)
    out = {}
    for name, m in on_gpu.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode():
            m(x)
        torch.cuda.synchronize()
        out[name] = {"latency_ms": latency[name]["median_ms"], "fps": 1000 / latency[name]["median_ms"],
                     "peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
                     "weights_allocated_mb": base / 2**20, "device": torch.cuda.get_device_name()}
        m.cpu()
    return out


def cost_benchmark(args) -> dict:
    size = args.size
    torch.manual_seed(0)
    model = randomize_gammas(create_model("yolact_resnet50", num_classes=80)).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    models, plans, pruning = {"unpruned": deployable(model), "fused": fuse_conv_bn(deployable(model), x)}, {}, {}
    for scope in ("seed", "beyond"):
        pruned, plans[scope], pruning[scope] = compress(model, x, scope, ratio=args.ratio)
        models[scope] = fuse_conv_bn(deployable(pruned), x)
    rows = {name: profile(m, x) for name, m in models.items()}
    latency = compare_latency(models, x, threads=args.threads, rounds=args.rounds, runs=args.runs, warmup=2)
    with tempfile.TemporaryDirectory() as tmp:
        for name in VARIANTS:
            spec = {"threads": args.threads, "size": size, "runs": 2, "fuse": name != "unpruned", "plan": None}
            if name in plans:
                spec["plan"] = str(Path(tmp) / f"{name}.json")
                plans[name].save(spec["plan"])
            rows[name]["rss_memory"] = run_child(__file__, "--child-memory", json.dumps(spec))
    for name, row in rows.items():
        row["memory"] = peak_tensor_mb(models[name], x)
        row.update(latency_ms=latency[name]["median_ms"], fps=1000 / latency[name]["median_ms"],
                   latency=latency[name], peak_memory_mb=row["memory"]["peak_mb"],
                   peak_rss_memory_mb=row["rss_memory"]["peak_mb"])
    cuda = cuda_figures(models, size, args.rounds)
    return {"model": "yolact_resnet50", "num_classes": 80, "input": [1, 3, size, size], "ratio": args.ratio,
            "weights": "random (seed 0), BN scales U[0, 1) (seed 0); no trained weights are downloadable here",
            "pruning": pruning, "variants": rows, "cuda": cuda, "vs_unpruned": _changes(rows),
            "seconds": time.perf_counter() - started}


def _changes(rows: dict) -> dict:
    """Per variant, % change against ``unpruned``: size, params, MACs, speed (fps), peak memory."""
    base = rows["unpruned"]
    pct = lambda a, b: 100 * (a / b - 1)  # noqa: E731
    return {name: {"size_change_pct": pct(r["size_bytes"], base["size_bytes"]),
                   "params_change_pct": pct(r["params"], base["params"]),
                   "macs_change_pct": pct(r["macs"], base["macs"]),
                   "speed_change_pct": pct(r["fps"], base["fps"]),
                   "memory_change_pct": pct(r["peak_memory_mb"], base["peak_memory_mb"]),
                   "rss_memory_change_pct": pct(r["peak_rss_memory_mb"], base["peak_rss_memory_mb"])}
            for name, r in rows.items() if name != "unpruned"}


# --- (b) accuracy at small scale ----------------------------------------------------------------------------------
def datasets(name: str, size: int, quick: bool):
    """(train, validation, number of classes, how the split was made)."""
    if name == "synthetic":
        from segprune.data.synthetic import SyntheticInstances

        n_train, n_val = (24, 8) if quick else (160, 48)  # 20 steps an epoch at batch 8
        kw = dict(size=(size, size), num_classes=4, seed=0)
        return (SyntheticInstances(num_samples=n_train, split="train", train=True, **kw),
                SyntheticInstances(num_samples=n_val, split="val", **kw), 4,
                f"synthetic instances: {n_train} train, {n_val} validation scenes (seed 0), 4 object classes")
    from segprune.data.instances import CocoInstances

    images, annotations = FRUITS / "images", FRUITS / "annotations.json"
    if not annotations.is_file():
        raise FileNotFoundError(f"{annotations}: the fruits set is missing")
    full = CocoInstances(images, annotations, size=(size, size))
    order = np.random.default_rng(0).permutation(len(full)).tolist()
    n_val = len(full) // 3
    train = Subset(CocoInstances(images, annotations, size=(size, size), train=True, seed=0), sorted(order[n_val:]))
    val = Subset(full, sorted(order[:n_val]))
    ids = [full.image_ids[i] for i in val.indices]
    return train, val, full.num_classes, (f"fruits_nuts_coco: {len(train)} train / {n_val} validation images "
                                          f"(numpy default_rng(0) permutation; validation image ids {ids})")


def accuracy_benchmark(name: str, args) -> dict:
    from segprune.data.instances import make_instance_loader
    from segprune.models.yolact import YolactLoss
    from segprune.models.yolact_loss import InstanceLoss
    from segprune.prune import BNSparsity
    from segprune.train.loop import fit

    torch.manual_seed(0)
    size = args.synthetic_size if name == "synthetic" else args.fruits_size
    train, val, num_classes, split = datasets(name, size, args.quick)
    loader = make_instance_loader(train, batch_size=8 if name == "synthetic" else 4, shuffle=True, seed=0,
                                  drop_last=True)
    # the fruits set has 12 training images (3 steps an epoch): more epochs for a comparable number of steps
    scale = 1 if name == "synthetic" else args.fruits_epoch_scale
    epochs, extra = (1, 1) if args.quick else (scale * args.epochs, scale * args.finetune_epochs)
    model = create_model("test_yolact", num_classes=num_classes, width=0.125, backbone_width=0.125)
    x = torch.zeros(1, 3, size, size)
    started = time.perf_counter()
    groups = channel_groups(model, model.prune_inputs(x))

    def train_(m, n, lr, reg=None, desc="train"):
        return fit(m, loader, epochs=n, lr=lr, optimizer="adamw", regularizer=reg, progress=False, desc=desc,
                   loss_fn=InstanceLoss(m, YolactLoss(num_classes)))

    losses = train_(model, epochs, args.lr, BNSparsity(model, lam=args.lam, groups=groups))
    print(f"{name}: trained {epochs} epochs, loss {losses[0]:.3f} -> {losses[-1]:.3f}", file=sys.stderr, flush=True)
    rows = {"unpruned": measure_instances(model, val, x)}
    control = copy.deepcopy(model).train()
    train_(control, extra, args.lr / 3, desc="control")
    rows["control"] = measure_instances(control, val, x)
    pruning = {}
    for scope in ("seed", "beyond"):
        pruned, _, pruning[scope] = compress(model, x, scope, ratio=args.ratio)
        train_(pruned.train(), extra, args.lr / 3, desc=f"fine-tune {scope}")
        rows[scope] = measure_instances(fuse_conv_bn(deployable(pruned), x), val, x)
    for row in rows.values():
        row.pop("coco", None)
    drop = {scope: {ref: 100 * (rows[ref]["mask_ap"] - rows[scope]["mask_ap"]) for ref in ("unpruned", "control")}
            for scope in ("seed", "beyond")}
    return {"dataset": name, "split": split, "model": "test_yolact(width=0.125, backbone_width=0.125)",
            "input": [size, size], "epochs": epochs, "extra_epochs": extra, "lam": args.lam, "ratio": args.ratio,
            "train_loss": losses, "pruning": pruning, "rows": rows, "mask_ap_drop_points": drop,
            "seconds": time.perf_counter() - started}


# --- report ---------------------------------------------------------------------------------------------------
def verdicts(cost: dict | None, accuracy: dict) -> dict:
    """Each seed goal, met or not, for ``seed`` and ``beyond``."""
    out = {}
    for scope in ("seed", "beyond"):
        got = {}
        if cost:
            change = cost["vs_unpruned"][scope]
            got.update(size=_goal(change["size_change_pct"], GOALS["size_change_pct"], lower=True),
                       speed=_goal(change["speed_change_pct"], GOALS["speed_change_pct"], lower=False),
                       memory=_goal(change["memory_change_pct"], GOALS["memory_change_pct"], lower=True))
        for name, acc in accuracy.items():
            if "mask_ap_drop_points" in acc:
                drop = acc["mask_ap_drop_points"][scope]["unpruned"]
                judged = acc["rows"]["unpruned"]["mask_ap"] >= MIN_AP  # a drop from ~0 AP says nothing
                got[f"mask_ap_{name}"] = {"value": drop, "goal": GOALS["mask_ap_drop_points"],
                                          "met": drop <= GOALS["mask_ap_drop_points"] if judged else None}
        out[scope] = got
    return out


def _goal(value: float, goal: float, *, lower: bool) -> dict:
    return {"value": value, "goal": goal, "met": value <= goal if lower else value >= goal}


def markdown(result: dict) -> str:
    lines = ["# YOLACT: the seed's measurements (benchmarks/yolact.py)", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch "
             f"{result['machine']['torch']}, CUDA {result['machine']['cuda']}. Commands: cost "
             f"`{result['commands']['cost']}`, accuracy `{result['commands']['accuracy']}`.", ""]
    cost = result.get("cost")
    if cost:
        lines += [f"## (a) Cost: YOLACT-ResNet50, {cost['input'][2]}x{cost['input'][3]}, batch 1, "
                  f"{cost['variants']['unpruned']['latency']['threads']} CPU threads", "", cost["weights"] + ".", "",
                  "| variant | params | MACs (G) | weights file (MB) | CPU latency (ms) | fps "
                  "| peak tensor memory (MiB) | peak RSS growth (MiB) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in cost["variants"].items():
            lines.append(f"| {name} | {r['params']:,} | {r['macs'] / 1e9:.2f} | {r['size_bytes'] / 1e6:.2f} | "
                         f"{r['latency_ms']:.0f} | {r['fps']:.3f} | {r['peak_memory_mb']:.0f} | "
                         f"{r['peak_rss_memory_mb']:.0f} |")
        lines += ["", "Change against unpruned (%):", "",
                  "| variant | file | params | MACs | speed (fps) | peak tensor memory | peak RSS growth |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, c in cost["vs_unpruned"].items():
            lines.append(f"| {name} | {c['size_change_pct']:+.1f} | {c['params_change_pct']:+.1f} | "
                         f"{c['macs_change_pct']:+.1f} | {c['speed_change_pct']:+.1f} | "
                         f"{c['memory_change_pct']:+.1f} | {c['rss_memory_change_pct']:+.1f} |")
        lines += ["", f"Pruning: {json.dumps(cost['pruning'])}. CUDA: "
                  f"{json.dumps(cost['cuda']) if cost['cuda'] else 'no GPU on this machine (null)'}.", ""]
    for name, acc in result["accuracy"].items():
        if "error" in acc:
            lines += [f"## (b) Accuracy on {name}: not measured ({acc['error']})", ""]
            continue
        lines += [f"## (b) Accuracy on {name}", "", f"{acc['split']}; {acc['model']} at {acc['input'][0]}x"
                  f"{acc['input'][1]}, {acc['epochs']} epochs with slimming (lam {acc['lam']}), then "
                  f"{acc['extra_epochs']} more epochs (fine-tuning, or training for the control).", "",
                  "| model | box AP | box AP50 | box AP75 | mask AP | mask AP50 | mask AP75 | params | MACs (M) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for model, r in acc["rows"].items():
            lines.append(f"| {model} | " + " | ".join(f"{100 * r[k]:.2f}" for k in (
                "box_ap", "box_ap50", "box_ap75", "mask_ap", "mask_ap50", "mask_ap75")) +
                f" | {r['params']:,} | {r['macs'] / 1e6:.1f} |")
        lines += ["", f"Mask AP drop (points): {json.dumps(acc['mask_ap_drop_points'])}", ""]
    lines += ["## The seed's goals", "", "| scope | goal | measured | goal value | met |", "|---|---|---:|---:|---|"]
    for scope, goals in result["verdicts"].items():
        for goal, v in goals.items():
            lines.append(f"| {scope} | {goal} | {v['value']:+.2f} | {v['goal']:+.2f} | {_met(v['met'])} |")
    return "\n".join([*lines, "", *[f"- {n}" for n in result["notes"]], ""])


def _met(met: bool | None) -> str:
    return "n/a (unpruned mask AP < 5 %: too low to judge)" if met is None else "yes" if met else "no"


NOTES = [
    "Size and memory goals are % changes (lower is better); speed is the % change of fps (higher is better); the "
    "mask AP goal is a drop of at most 1 point against the unpruned model on the set it was trained on (the "
    "control row, trained as long as the pruned models, is given too).",
    "The seed's memory is GPU memory at run time; without a GPU the goal is judged on the peak tensor memory of one "
    "CPU inference (weights, input and every live intermediate, tracked op by op: what max_memory_allocated counts "
    "on a GPU). The peak RSS growth of a fresh process (weights' bytes + VmHWM growth during inference) is given "
    "too; it moves with the allocator (glibc arenas, freed holes) and with other processes, by tens of MiB.",
    "CPU latencies were taken on a machine shared with other jobs; the interleaved rounds make the before/after "
    "ratio fair, not the absolute milliseconds.",
]


def _previous(name: str) -> dict:
    """The last results of this benchmark (a part skipped now keeps its earlier figures and command)."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: small input, one round, a few images")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=3, help="timed runs per model per round")
    p.add_argument("--ratio", type=float, default=0.5, help="share of prunable channels removed")
    p.add_argument("--size", type=int, default=550, help="input of the cost benchmark")
    p.add_argument("--synthetic-size", type=int, default=96, help="input of the accuracy benchmark, synthetic set")
    p.add_argument("--fruits-size", type=int, default=160, help="input of the accuracy benchmark, fruits set")
    p.add_argument("--epochs", type=int, default=40, help="training epochs on the synthetic set")
    p.add_argument("--finetune-epochs", type=int, default=10, help="fine-tuning (and control) epochs")
    p.add_argument("--fruits-epoch-scale", type=int, default=4, help="the fruits set trains this many times longer")
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--lam", type=float, default=1e-4)
    p.add_argument("--skip-cost", action="store_true", help="keep the cost figures of the last results file")
    p.add_argument("--skip-accuracy", action="store_true", help="keep the accuracy figures of the last results file")
    p.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_memory:
        print(json.dumps(child_memory(json.loads(args.child_memory))))
        return
    if args.quick:
        args.size, args.synthetic_size, args.fruits_size, args.rounds, args.runs = 160, 64, 64, 1, 1
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    name = "yolact_quick" if args.quick else "yolact"
    command = "python benchmarks/yolact.py " + " ".join(sys.argv[1:])
    cost = None if args.skip_cost else cost_benchmark(args)
    accuracy = {}
    if not args.skip_accuracy:
        for dataset in ("synthetic", "fruits"):
            try:
                accuracy[dataset] = accuracy_benchmark(dataset, args)
            except FileNotFoundError as err:
                accuracy[dataset] = {"error": str(err)}
    kept = _previous(name)  # read last: a part skipped here keeps what a run beside this one wrote meanwhile
    commands = {"cost": command, "accuracy": command}
    earlier = [*kept.get("earlier_cost", []), kept["cost"]] if kept.get("cost") and not args.skip_cost else []
    if args.skip_cost:
        earlier = kept.get("earlier_cost", [])
        cost = kept.get("cost")
        commands["cost"] = kept.get("commands", {}).get("cost", kept.get("command")) if cost else None
    if args.skip_accuracy:
        accuracy = kept.get("accuracy", {})
        commands["accuracy"] = kept.get("commands", {}).get("accuracy", kept.get("command")) if accuracy else None
    result = {"benchmark": "yolact", "command": command, "commands": commands, "machine": machine(),
              "goals": GOALS, "cost": cost, "accuracy": accuracy, "verdicts": verdicts(cost, accuracy),
              "notes": NOTES, "seconds": time.perf_counter() - started, "earlier_cost": earlier}
    write_result(name, result)
    path = RESULTS / f"{name}.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(markdown(result))
    tmp.replace(path)


if __name__ == "__main__":
    main()
