"""The compression pipeline every recipe runs (and `segprune demo` runs with the defaults):

train (with the method's sparsity, if any) -> prune (one pass, or several with fine-tuning between) ->
fine-tune (optionally distilled from the unpruned model) -> fuse Conv+BN -> measure before and after
(mIoU, params, MACs, weights file, interleaved CPU latency) -> report + checkpoint.

A `Recipe` is a flat dataclass: a YAML file overlays its defaults, `--set key=value` overrides are
type-checked, unknown keys raise, and the resolved recipe is saved with every run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, Subset

from segprune import checkpoint
from segprune.eval.metrics import evaluate, predict
from segprune.eval.profile import compare_latency, profile
from segprune.export.fuse import fuse_conv_bn
from segprune.models import create_model
from segprune.prune import BNSparsity, CAPSparsity, Taylor, channel_groups, prune
from segprune.prune.criteria import CRITERIA
from segprune.report.writer import table, write_report
from segprune.train.distill import distillation
from segprune.train.loop import fit

METHODS = ("slimming", "cap", "bn_scale", "l1", "l2", "fpgm", "taylor", "random", "postprune")
SCHEDULES = ("iterative", "two_stage", "layer_by_layer")
_TUPLE_ITEMS = {"aux_layers": str, "aux_weights": float}  # tuples of other settings hold ints


@dataclass
class Recipe:
    """Everything a run does. The defaults are the demo: 2 CPU cores, about 2 minutes."""

    name: str = "demo"
    model: str = "pspnet_resnet18"
    width: float = 0.25
    data: str = "synthetic"  # or a dataset name of segprune.data.build_dataset, with data_root
    data_root: str = ""
    num_classes: int = 6  # synthetic data only; real datasets bring their own
    size: tuple[int, int] = (96, 128)  # training crop (H, W); synthetic scene size
    eval_size: tuple[int, int] = (0, 0)  # resize validation images to (H, W); (0, 0) = their own size
    train_samples: int = 320  # synthetic: how many to generate; real data: use the first N (0 = all)
    val_samples: int = 96
    val_split: str = "val"
    batch_size: int = 8
    epochs: int = 12
    optimizer: str = "adamw"  # converges in a dozen CPU epochs; "sgd" (poly LR) is the papers' choice
    class_weights: bool = False  # weight the loss by the dataset's class weights (CamVid: SegNet's median frequency)
    lr: float = 0.006
    method: str = "slimming"  # one of METHODS
    lam: float = 5e-4  # sparsity on BN scales (slimming, cap), added to their gradients
    warmup: int = 0  # steps over which lam ramps up
    cap_affinity: str = "dot"
    cap_weight: str = "one_minus"
    cap_temperature: float = 0.1
    ratio: float = 0.5  # fraction of prunable channels removed (when target_macs is 0)
    target_macs: float = 0.0  # if > 0: remove until MACs <= this fraction of the original
    min_keep: float = 0.1
    round_to: int = 0
    iterations: int = 1  # prune/fine-tune passes
    finetune_epochs: int = 8
    finetune_lr: float = 0.002
    kd_alpha: float = 0.0  # distillation from the unpruned model during fine-tuning (0 = off)
    kd_temperature: float = 4.0
    threads: int = 2
    latency_rounds: int = 7  # interleaved before/after rounds of the latency measurement
    latency_runs: int = 10  # timed runs per model per round
    report_samples: int = 3  # validation images shown as input | truth | unpruned | pruned in report.html
    device: str = "cpu"
    seed: int = 0
    # `segprune train` only (segprune.train.loop.fit):
    accumulate: int = 1  # optimizer step every k batches (global batch = batch_size * k)
    amp: bool = False  # autocast: float16 + GradScaler on CUDA; on CPU only with amp_dtype=bfloat16
    amp_dtype: str = ""  # "" = float16 on CUDA; "bfloat16"
    checkpoint_every: int = 0  # training checkpoint every N optimizer steps (0 = at epoch ends only)
    sync_bn: bool = False  # SyncBatchNorm under torchrun (CUDA only)
    num_workers: int = 0  # data loader processes per training process
    # method "postprune" only (segprune.prune.postprune: weakest-link path -> selection -> retraining):
    path_step: float = 0.05  # MACs removed per path step, as a fraction of the original (>= 1: channels per step)
    path_min_macs: float = 0.1  # walk the path down to this fraction of the MACs
    path_criterion: str = "taylor"  # dL per channel: "taylor" or "ablation" (exact, small models only)
    path_selector: str = "rank"  # "rank" or "lasso" (He et al.: LASSO picks the channels, least squares refits)
    path_batches: int = 4  # training batches forming the pruning split
    path_recover_steps: int = 0  # fine-tuning batches between path steps (0 = none)
    path_rule: str = "delta"  # "delta": smallest within path_delta of the best validation mIoU; "1se"
    path_delta: float = 0.01  # mIoU as a fraction (0.01 = one point)
    # Miao et al. (segprune.prune.schedules; segprune.train.aux):
    schedule: str = "iterative"  # "iterative" (`iterations` passes), "two_stage" (global) or "layer_by_layer"
    stage_a: float = 0.5  # two_stage: the fraction of the MAC reduction removed in stage A (stage B: the rest)
    stage_a_epochs: int = 1  # two_stage: fine-tuning epochs after stage A (after stage B: finetune_epochs)
    layer_epochs: int = 1  # layer_by_layer: fine-tuning epochs after each channel group
    aux_layers: tuple[str, ...] = ()  # auxiliary heads on these layers while training and fine-tuning (not deployed)
    aux_weights: tuple[float, ...] = ()  # one loss weight per aux layer
    layer_pruning: bool = False  # first remove residual blocks (segprune.prune.blocks), least loss increase first
    layer_tolerance: float = 0.05  # ... while the loss on layer_batches training batches rises at most this much
    layer_max: int = 0  # ... and at most this many blocks (0 = no limit)
    layer_batches: int = 4
    layer_metric: str = "loss"  # or "miou": score blocks by the drop in mIoU (layer_tolerance then in mIoU, 0.01)
    slim_widths: str = ""  # then set layers' output widths, "name=width,..." (e.g. "ppm.branches=128,head.0=128")

    def check(self) -> Recipe:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if not 0 <= self.ratio < 1 or not 0 <= self.target_macs <= 1 or self.iterations < 1:
            raise ValueError("ratio must be in [0, 1), target_macs in [0, 1] (0 = use ratio), iterations >= 1")
        if self.accumulate < 1 or self.checkpoint_every < 0 or self.num_workers < 0:
            raise ValueError("accumulate must be >= 1, checkpoint_every >= 0 and num_workers >= 0")
        if self.path_delta < 0 or self.path_step <= 0 or self.path_batches < 1:
            raise ValueError("path_delta must be >= 0, path_step > 0 and path_batches >= 1")
        if self.schedule not in SCHEDULES or not 0 < self.stage_a <= 1:
            raise ValueError(f"schedule must be one of {SCHEDULES} and stage_a in (0, 1], got {self.schedule!r}, "
                             f"{self.stage_a}")
        if self.layer_tolerance < 0 or self.layer_max < 0 or self.layer_batches < 1:
            raise ValueError("layer_tolerance and layer_max must be >= 0, layer_batches >= 1")
        if self.layer_metric not in ("loss", "miou"):
            raise ValueError(f"layer_metric must be 'loss' or 'miou', got {self.layer_metric!r}")
        slim_widths(self.slim_widths)
        if len(self.aux_weights) != len(self.aux_layers):
            raise ValueError(f"aux_weights needs one weight per aux layer: {self.aux_weights} for {self.aux_layers}")
        if self.path_rule not in ("delta", "1se"):
            raise ValueError(f"path_rule must be 'delta' or '1se', got {self.path_rule!r}")
        return self


def recipe_from(path: str | Path | None = None, overrides: dict | None = None) -> Recipe:
    """A Recipe from a flat YAML file and `key=value` overrides; unknown keys and bad types raise ValueError."""
    values = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a recipe is a flat mapping of settings")
        values.update(loaded)
    values.update(overrides or {})
    recipe, known = Recipe(), {f.name: f for f in fields(Recipe)}
    for key, value in values.items():
        if key not in known:
            where = f" in {path}" if path else ""
            raise ValueError(f"unknown setting {key!r}{where}; known: {', '.join(known)}")
        setattr(recipe, key, _typed(key, value, getattr(Recipe(), key)))
    return recipe.check()


def _typed(key, value, default):
    try:
        if isinstance(default, tuple):
            value = _json_or_list(value) if isinstance(value, str) else value
            value = [value] if isinstance(value, (str, int, float)) else value
            return tuple(_TUPLE_ITEMS.get(key, int)(v) for v in value)
        if isinstance(default, bool):
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        return type(default)(value)
    except (TypeError, ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"setting {key}={value!r} is not a {type(default).__name__}") from err


def _json_or_list(text: str):
    """A JSON list, or a comma-separated one (`--set aux_layers=backbone.layer2,backbone.layer3`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return [part.strip() for part in text.split(",") if part.strip()]


# --- stages --------------------------------------------------------------------------------------------------
def loaders(r: Recipe) -> tuple[DataLoader, DataLoader, int]:
    """(train loader, validation loader, number of classes)."""
    g = torch.Generator().manual_seed(r.seed)
    if r.data == "synthetic":
        from segprune.data.synthetic import SyntheticScenes

        kw = dict(size=r.size, num_classes=r.num_classes, seed=r.seed)
        train = SyntheticScenes(num_samples=r.train_samples, split="train", **kw)
        val = SyntheticScenes(num_samples=r.val_samples, split="val", **kw)
        classes = r.num_classes
    else:
        from segprune.data import build_dataset
        from segprune.data.transforms import eval_transforms, train_transforms

        train = build_dataset(r.data, root=r.data_root, split="train",
                              transform=train_transforms(crop=r.size, seed=r.seed))
        val = build_dataset(r.data, root=r.data_root, split=r.val_split,
                            transform=eval_transforms(size=r.eval_size if all(r.eval_size) else None))
        classes = train.num_classes
        train, val = _first(train, r.train_samples), _first(val, r.val_samples)
    return (DataLoader(train, batch_size=r.batch_size, shuffle=True, generator=g, drop_last=True),
            DataLoader(val, batch_size=r.batch_size), classes)


def loss_fn(r: Recipe, train_loader) -> nn.Module:
    """Cross-entropy ignoring void (255), weighted by the dataset's `class_weights` when the recipe asks for it."""
    dataset = getattr(train_loader.dataset, "dataset", train_loader.dataset)  # through a Subset
    weights = getattr(dataset, "class_weights", None) if r.class_weights else None
    if r.class_weights and weights is None:
        raise ValueError(f"class_weights: the {r.data} dataset has no class weights")
    weight = None if weights is None else torch.as_tensor(weights, dtype=torch.float32, device=r.device)
    return nn.CrossEntropyLoss(weight=weight, ignore_index=255)


def _first(dataset, n: int):
    return Subset(dataset, range(min(n, len(dataset)))) if n > 0 else dataset


def sparsity(r: Recipe, model: nn.Module, groups) -> BNSparsity | None:
    """The regulariser the method trains with: slimming's L1, CAP's guided L1, or none."""
    if r.method == "slimming":
        return BNSparsity(model, lam=r.lam, groups=groups, warmup=r.warmup)
    if r.method == "cap":
        return CAPSparsity(model, lam=r.lam, groups=groups, warmup=r.warmup, affinity=r.cap_affinity,
                           weight=r.cap_weight, temperature=r.cap_temperature)
    return None


def criterion(r: Recipe, model: nn.Module, train_loader):
    """The channel scores the method prunes by."""
    if r.method in ("slimming", "cap"):
        return "bn_scale"
    if r.method == "taylor":
        batches = [b for _, b in zip(range(8), train_loader)]
        return Taylor(model, batches, lambda out, y: F.cross_entropy(out["out"], y, ignore_index=255))
    return r.method if r.method in CRITERIA else "bn_scale"


def gamma_histogram(model: nn.Module, bins: int = 10) -> list[int]:
    """Counts of |gamma| over all BatchNorms in [0, max] (how sparse slimming made them)."""
    gammas = torch.cat([m.weight.detach().abs().flatten() for m in model.modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None])
    return np.histogram(gammas.cpu().numpy(), bins=bins, range=(0, float(gammas.max()) or 1.0))[0].tolist()


def prune_and_finetune(r, model, example, groups, train_loader, log, progress):
    """`iterations` passes of prune + fine-tune; returns (pruned model, composed plan, channels removed)."""
    teacher = model if r.kd_alpha > 0 else None
    current, plan, removed = model, None, 0
    for it in range(r.iterations):
        step = dict(target_macs=r.target_macs ** ((it + 1) / r.iterations) if r.target_macs else None,
                    ratio=None if r.target_macs else 1 - (1 - r.ratio) ** (1 / r.iterations))
        result = prune(current, example, criterion=criterion(r, current, train_loader), min_keep=r.min_keep,
                       round_to=r.round_to or None, groups=groups if it == 0 else None, **step)
        removed += result.channels_removed
        plan = result.plan if plan is None else plan.then(result.plan)
        log(f"    pass {it + 1}/{r.iterations}: removed {result.channels_removed} channels")
        extra = distillation(teacher, alpha=r.kd_alpha, temperature=r.kd_temperature) if teacher else None
        fit_aux(r, example, result.model, train_loader, epochs=math.ceil(r.finetune_epochs / r.iterations),
                lr=r.finetune_lr, optimizer=r.optimizer, extra_loss=extra, device=r.device, progress=progress,
                desc="fine-tune", criterion=loss_fn(r, train_loader))
        current = result.model
    return current, plan, removed


def postprune_and_finetune(r, model, example, train_loader, val_loader, num_classes, out, log, progress):
    """Post-pruning (Liu): the weakest-link path scored on `path_batches` training batches, one sub-network
    chosen on the validation split, retrained `finetune_epochs`; writes path.json and path.png into `out`."""
    from segprune.eval.validation import val_miou
    from segprune.prune.postprune import pruning_path, select
    from segprune.report.plots import plot_path

    crit = loss_fn(r, train_loader)
    batches = [(x.to(r.device), y.to(r.device)) for _, (x, y) in zip(range(r.path_batches), train_loader)]
    recover_batches = [b for _, b in zip(range(r.path_recover_steps), train_loader)]
    recover = (lambda m: fit_aux(r, example, m, recover_batches, epochs=1, lr=r.finetune_lr, optimizer=r.optimizer,
                                 device=r.device, progress=False, desc="recover", criterion=crit)
               ) if recover_batches else None
    path = pruning_path(model, example, batches, val_miou(val_loader, num_classes, device=r.device),
                        step=int(r.path_step) if r.path_step >= 1 else r.path_step, criterion=r.path_criterion,
                        selector=r.path_selector, recover=recover, min_macs=r.path_min_macs, min_keep=r.min_keep,
                        loss_fn=lambda out, y: crit(out["out"] if isinstance(out, dict) else out, y), log=log)
    chosen = select(path, delta=r.path_delta, rule=r.path_rule)
    path.save(out / "path.json", selected=chosen)
    plot_path(path, out / "path.png", selected=chosen)
    step = path.steps[chosen]
    log(f"    selected step {chosen} of {len(path) - 1} ({r.path_rule}): MACs {step.macs / path.steps[0].macs:.3f}, "
        f"validation mIoU {step.miou:.4f} (best {max(s.miou for s in path.steps):.4f})")
    pruned = path.model_at(chosen, model)
    fit_aux(r, example, pruned, train_loader, epochs=r.finetune_epochs, lr=r.finetune_lr, optimizer=r.optimizer,
            device=r.device, progress=progress, desc="retrain", criterion=crit)  # with the recipe's aux heads
    return pruned, step.plan, step.removed


def fit_aux(r: Recipe, example, model, loader, *, criterion, extra_loss=None, **kwargs):
    """`fit`, with the recipe's auxiliary heads (`aux_layers`) attached for its duration and removed after."""
    if not r.aux_layers:
        return fit(model, loader, criterion=criterion, extra_loss=extra_loss, **kwargs)
    from segprune.train.aux import AuxLoss, add_losses

    with AuxLoss(model, r.aux_layers, r.aux_weights, example_inputs=example) as aux:
        return fit(model, loader, criterion=aux.criterion(criterion), extra_loss=add_losses(extra_loss, aux.extra_loss),
                   **kwargs)


def schedule_and_finetune(r, model, example, train_loader, log, progress):
    """Miao et al.'s schedules to `target_macs`: two-stage global (prune part, fine-tune `stage_a_epochs`, re-score,
    prune the rest, fine-tune `finetune_epochs`) or layer by layer (`layer_epochs` after each group)."""
    from segprune.prune.schedules import layer_by_layer, two_stage_global

    name = "bn_scale" if r.method in ("slimming", "cap") else r.method
    if not r.target_macs or name not in CRITERIA:
        raise ValueError(f"schedule {r.schedule} needs target_macs > 0 and a weight criterion (method one of "
                         f"{sorted(CRITERIA)}, slimming or cap), got target_macs={r.target_macs}, method {r.method}")
    extra = distillation(model, alpha=r.kd_alpha, temperature=r.kd_temperature) if r.kd_alpha > 0 else None
    finetune = lambda m, epochs: fit_aux(r, example, m, train_loader, epochs=epochs, lr=r.finetune_lr,  # noqa: E731
                                         optimizer=r.optimizer, extra_loss=extra, device=r.device, progress=progress,
                                         desc="fine-tune", criterion=loss_fn(r, train_loader))
    common = dict(target_macs=r.target_macs, finetune=finetune, criterion=name, min_keep=r.min_keep)
    if r.schedule == "two_stage":
        result = two_stage_global(model, example, stage_a=r.stage_a, epochs=(r.stage_a_epochs, r.finetune_epochs),
                                  round_to=r.round_to or None, **common)
    else:
        result = layer_by_layer(model, example, epochs_per_layer=r.layer_epochs, **common)
    reached = f" to MACs {result.stages[-1]['macs']:.3f} of the model given" if result.stages else ""
    log(f"    {r.schedule}: {len(result.stages)} cuts{reached}; retraining {result.retrain_seconds:.1f} s")
    return result.model, result.plan, sum(s["removed"] for s in result.stages)


def slim_widths(text: str) -> dict[str, int]:
    """`"ppm.branches=128,head.0=128"` -> {layer: width}; a malformed entry is a clear error."""
    widths = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, width = part.partition("=")
        if not name or not width.strip().isdigit():
            raise ValueError(f"slim_widths: {part!r} is not name=width (e.g. ppm.branches=128)")
        widths[name.strip()] = int(width)
    return widths


def _classes(model: nn.Module, example) -> int:
    training = model.training
    with torch.no_grad():
        out = model.eval()(example)
    model.train(training)
    return (out["out"] if isinstance(out, dict) else out).shape[1]


def optimise_structure(r, model, example, train_loader, log):
    """Miao et al.'s structure step, before channel pruning: remove residual blocks (`layer_pruning`), then set named
    layers' widths (`slim_widths`). Returns (model, plan or None, its MACs as a fraction of the original)."""
    if not r.layer_pruning and not r.slim_widths:
        return model, None, 1.0
    from segprune.eval.validation import miou_metric
    from segprune.prune.blocks import prune_blocks, slim_layers
    from segprune.prune.plan import Plan
    from segprune.prune.trace import trace

    current, plan = model, Plan()
    if r.layer_pruning:
        batches = [(x.to(r.device), y.to(r.device)) for _, (x, y) in zip(range(r.layer_batches), train_loader)]
        metric = miou_metric(_classes(model, example)) if r.layer_metric == "miou" else None
        result = prune_blocks(current, example, batches, tolerance=r.layer_tolerance, max_blocks=r.layer_max or None,
                              loss_fn=loss_fn(r, train_loader), metric_fn=metric)
        log(f"    layer pruning: removed {len(result.removed)} blocks {[b.name for b in result.removed]}")
        current, plan = result.model, plan.then(result.plan)
    if r.slim_widths:
        crit = "bn_scale" if r.method in ("slimming", "cap") else "l1"
        result = slim_layers(current, example, slim_widths(r.slim_widths), criterion=crit)
        log(f"    slimmed {r.slim_widths}: removed {result.channels_removed} channels")
        current, plan = result.model, plan.then(result.plan)
    macs = lambda m: sum(trace(m, example, modes=("eval",)).macs.values())  # noqa: E731
    return current, plan, macs(current) / max(macs(model), 1)


def measure(model, val_loader, example, num_classes) -> dict:
    metrics = evaluate(model, val_loader, num_classes=num_classes)
    binary = {"fg_iou": metrics["fg_iou"]} if "fg_iou" in metrics else {}  # two-class (person) data
    return {"miou": metrics["miou"], **binary, "iou": metrics["iou"], **profile(model, example)}


# --- the run ---------------------------------------------------------------------------------------------------
def run(r: Recipe, out: str | Path, *, force: bool = False, progress: bool = True) -> dict:
    """Run recipe `r` into folder `out`; returns the report (also out/report.json, report.md, recipe.yaml)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} already holds a run; choose another --out or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(as_plain(r), sort_keys=False))
    start, log = time.perf_counter(), RunLog(out / "log.txt", progress)
    torch.manual_seed(r.seed)
    torch.set_num_threads(r.threads)
    train_loader, val_loader, num_classes = loaders(r)
    model_kwargs = {"num_classes": num_classes, "width": r.width}
    model = create_model(r.model, **model_kwargs).to(r.device)
    example = torch.zeros(1, 3, *r.size, device=r.device)
    groups = channel_groups(model, example)
    reg, histograms = sparsity(r, model, groups), []

    log(f"1/4 training {r.model} (width {r.width}) for {r.epochs} epochs; method {r.method}")
    fit_aux(r, example, model, train_loader, epochs=r.epochs, lr=r.lr, optimizer=r.optimizer, regularizer=reg,
            device=r.device, progress=progress, desc="train", criterion=loss_fn(r, train_loader),
            on_epoch=lambda e, loss: histograms.append(gamma_histogram(model)))
    if isinstance(reg, CAPSparsity):
        reg.remove()  # nothing of CAP stays in the model
    log(f"    |gamma| histogram after training: {histograms[-1] if histograms else []}")
    before = measure(model, val_loader, example, num_classes)
    structured, structure_plan, fraction = optimise_structure(r, model, example, train_loader, log)
    # the channel stage's target stays a fraction of the original model's MACs
    rc = r if structure_plan is None else replace(r, target_macs=min(1.0, r.target_macs / fraction) if r.target_macs
                                                  else 0.0)

    what = f"to {r.target_macs:.0%} of the MACs" if r.target_macs else f"{r.ratio:.0%} of prunable channels"
    if r.method == "postprune":
        what = f"along a path of {r.path_step:g} MACs a step down to {r.path_min_macs:.0%}, then selecting"
    log(f"2/4 pruning {what} ({r.method}), 3/4 fine-tuning {r.finetune_epochs} epochs")
    if r.method == "postprune":
        pruned, plan, removed = postprune_and_finetune(rc, structured, example, train_loader, val_loader, num_classes,
                                                       out, log, progress)
    elif r.schedule != "iterative":
        pruned, plan, removed = schedule_and_finetune(rc, structured, example, train_loader, log, progress)
    else:
        pruned, plan, removed = prune_and_finetune(rc, structured, example, groups if structure_plan is None else None,
                                                   train_loader, log, progress)
    plan = plan if structure_plan is None else structure_plan.then(plan)
    checkpoint.save(out / "pruned", pruned, plan=plan, config={"model": r.model, "model_kwargs": model_kwargs})

    log("4/4 fusing Conv+BN and measuring (latency interleaved before/after)")
    deployed = fuse_conv_bn(pruned, example)
    after = measure(deployed, val_loader, example, num_classes)
    latency = compare_latency({"before": model, "after": deployed}, example, threads=r.threads,
                              rounds=r.latency_rounds, runs=r.latency_runs)
    for side, row in (("before", before), ("after", after)):
        row["latency_ms"], row["latency"] = latency[side]["median_ms"], latency[side]
    prunable = sum(int(g.prunable.sum()) for g in groups)
    report = {"title": f"{r.name}: {r.model} ({r.method})", "recipe": as_plain(r),
              "seconds": time.perf_counter() - start, "before": before, "after": after,
              "pruning": {"removed_channels": removed, "prunable_channels": prunable,
                          "removed_fraction": removed / max(prunable, 1), "groups": len(groups)},
              "gamma_histograms": histograms, "notes": _notes(r), "widths": layer_widths(model, pruned, groups)}
    write_report(out, report,  # the overlays are drawn, or their failure noted, inside write_report
                 samples=lambda: sample_predictions(model, deployed, val_loader, r.report_samples, num_classes))
    log(table(before, after))
    if "fg_iou" in after:
        log(f"foreground IoU {before['fg_iou']:.4f} -> {after['fg_iou']:.4f} (mIoU over the two classes "
            f"{before['miou']:.4f} -> {after['miou']:.4f})")
    log(f"done in {report['seconds']:.0f} s: {out / 'report.md'}")
    return report


# --- report material (report.html) -----------------------------------------------------------------------------
def layer_widths(before: nn.Module, after: nn.Module, groups) -> dict[str, list[int]]:
    """{layer: [output channels before, after]} of every conv with prunable output channels, in model order
    (0 after: the layer is gone or bypassed)."""
    prunable = {name for g in groups if not g.frozen for name in g.modules("out")}
    pruned = dict(after.named_modules())
    return {name: [m.out_channels, getattr(pruned.get(name), "out_channels", 0)] for name, m in before.named_modules()
            if name in prunable and hasattr(m, "out_channels")}


@torch.no_grad()
def sample_predictions(before: nn.Module, after: nn.Module, loader, count: int, num_classes: int) -> dict | None:
    """The first `count` validation images, their targets and both models' predicted labels (the overlays)."""
    images, targets, count = [], [], max(count, 0)
    for x, y in loader:
        images += list(x[: count - len(images)])
        targets += list(y[: count - len(targets)])
        if len(images) >= count:
            break
    if not images:
        return None
    preds = {"before": [], "after": []}
    for name, model in (("before", before), ("after", after)):
        training, device = model.training, next(model.parameters()).device
        model.eval()
        for x, y in zip(images, targets):
            logits = predict(model, x[None].to(device))
            if logits.shape[-2:] != y.shape[-2:]:
                logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear")
            preds[name].append(logits.argmax(1)[0].cpu().numpy())
        model.train(training)
    dataset = getattr(loader.dataset, "dataset", loader.dataset)  # through a Subset
    return {"images": [x.numpy() for x in images], "targets": [y.numpy() for y in targets], **preds,
            "num_classes": num_classes, "ignore_index": getattr(dataset, "ignore_index", 255),
            "class_names": list(getattr(dataset, "class_names", []))}


def as_plain(r: Recipe) -> dict:
    """The recipe as plain YAML/JSON values (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(r).items()}


def _notes(r: Recipe) -> list[str]:
    return [f"before = the model as trained ({r.epochs} epochs, method {r.method}, unfused); after = pruned, "
            f"fine-tuned {r.finetune_epochs} more epochs, Conv+BN fused: part of its mIoU change is that extra "
            "training.", f"mIoU on the {r.data} {r.val_split} split; MACs = FLOPs / 2 for one "
            f"1x3x{r.size[0]}x{r.size[1]} input (torch.utils.flop_counter)."]


class RunLog:
    """Print a line and keep it in the run's log file."""

    def __init__(self, path: Path, echo: bool):
        self.path, self.echo = path, echo

    def __call__(self, line: str) -> None:
        if self.echo:
            print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")
