"""The instance-segmentation (YOLACT) compression pipeline: `segprune demo --task instance`.

The seed's recipe (Ning et al. 2023, METHODS.md section 1), end to end on the embedded synthetic instances:

train with γ-sparsity on the BN scales (network slimming; in YOLACT only the backbone has BN, and it is trainable
here) -> COCO box and mask AP -> one global |γ| threshold prunes the backbone's channels (traced through
``model.prune_inputs`` so prototypes and mask coefficients stay coupled) -> fine-tune -> Conv–BN fusion -> the same
measurements after -> report (report.json, report.md, report.html) and a checkpoint of the pruned model.

It is a separate module from :mod:`segprune.pipeline` because every stage differs in its details (list-of-dict
targets, YOLACT's loss, COCOeval instead of mIoU, the ``prune_inputs`` trace); the recipe is the same
:class:`~segprune.pipeline.Recipe`, read as :mod:`segprune.train.instance` reads it, with the demo's defaults
(:data:`DEMO`) under the user's ``--set`` overrides.

Measured models are the deployable ones: the semantic auxiliary head (training only) is dropped from both the
unpruned and the pruned model before params, MACs, file size and latency are taken.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.utils.data import Dataset, Subset

from segprune import checkpoint
from segprune.data.instances import make_instance_loader
from segprune.eval.profile import compare_latency, profile
from segprune.export.fuse import fuse_conv_bn
from segprune.models import create_model
from segprune.pipeline import Recipe, RunLog, as_plain, gamma_histogram, layer_widths, recipe_from
from segprune.prune import BNSparsity, channel_groups, prune
from segprune.prune.criteria import bn_scale
from segprune.report.writer import INSTANCE_ROWS, table, write_report
from segprune.train.instance import InstanceLoss, evaluate_model, instance_datasets
from segprune.train.loop import fit

# The demo: about 2 minutes of CPU time. test_yolact at width 1/8 (FPN, protonet and head 32 channels wide; the
# backbone stays test_yolact's 1/32), 4 object classes (num_classes counts the scenes' ground and sky). YOLACT
# trained from scratch learns slowly: after these 800 steps its validation AP is about 8 % (box) and 6 % (mask),
# seed 0; benchmarks/yolact.py trains a wider backbone for longer.
DEMO = dict(name="instance-demo", model="test_yolact", width=0.125, data="synthetic", num_classes=6, size=(96, 96),
            train_samples=160, val_samples=48, batch_size=8, epochs=40, optimizer="adamw", lr=0.003,
            method="slimming", lam=1e-4, ratio=0.5, min_keep=0.1, finetune_epochs=10, finetune_lr=0.001,
            latency_rounds=5, latency_runs=10)
AP_KEYS = {"AP": "ap", "AP50": "ap50", "AP75": "ap75"}


def demo_recipe(overrides: dict | None = None) -> Recipe:
    """The instance demo's recipe with `overrides` (``--set key=value``) on top."""
    r = recipe_from(None, {**DEMO, **(overrides or {})})
    if r.method not in ("slimming", "bn_scale"):
        raise ValueError(f"the instance pipeline runs the seed's method: slimming (or bn_scale without sparsity "
                         f"training), got {r.method!r}")
    return r


def deployable(model: nn.Module) -> nn.Module:
    """A copy of a YOLACT model without its training-only semantic head."""
    out = copy.deepcopy(model)
    if getattr(out, "seg_head", None) is not None:
        out.seg_head = None
    return out.eval()


def ap_row(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """COCOeval figures as flat keys: box_ap, box_ap50, box_ap75, mask_ap, mask_ap50, mask_ap75."""
    return {f"{prefix}_{short}": float(metrics[kind][name]) for kind, prefix in (("bbox", "box"), ("segm", "mask"))
            for name, short in AP_KEYS.items()}


def measure_instances(model: nn.Module, val: Dataset, example: torch.Tensor, *, batch_size: int = 8,
                      device="cpu") -> dict:
    """Box and mask AP on `val` (COCOeval) and the static cost of the deployable model on `example`."""
    metrics = evaluate_model(model, val, batch_size=batch_size, device=device)
    return {**ap_row(metrics), "coco": metrics, **profile(deployable(model), example)}


def train_slimming(r: Recipe, model: nn.Module, loader, num_classes: int, groups, *, progress: bool,
                   on_epoch=None) -> list[float]:
    """Train `r.epochs` with the YOLACT loss and, for ``slimming``, λ·sign(γ) on the prunable groups' BN scales."""
    reg = BNSparsity(model, lam=r.lam, groups=groups, warmup=r.warmup) if r.method == "slimming" else None
    return fit(model, loader, epochs=r.epochs, lr=r.lr, optimizer=r.optimizer, regularizer=reg, device=r.device,
               progress=progress, desc="train", on_epoch=on_epoch,
               loss_fn=InstanceLoss(model, _loss(num_classes)))


def finetune(r: Recipe, model: nn.Module, loader, num_classes: int, *, progress: bool) -> list[float]:
    """Fine-tune `r.finetune_epochs` at `r.finetune_lr` without the sparsity term."""
    return fit(model, loader, epochs=r.finetune_epochs, lr=r.finetune_lr, optimizer=r.optimizer, device=r.device,
               progress=progress, desc="fine-tune", loss_fn=InstanceLoss(model, _loss(num_classes)))


def _loss(num_classes: int) -> nn.Module:
    from segprune.models.yolact import YolactLoss

    return YolactLoss(num_classes)


def run_instance(r: Recipe, out: str | Path, *, force: bool = False, progress: bool = True) -> dict:
    """Run the instance pipeline of recipe `r` into folder `out`; returns the report (also out/report.json,
    report.md, report.html, recipe.yaml, log.txt and the pruned checkpoint in out/pruned)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} already holds a run; choose another --out or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    plain = {**as_plain(r), "task": "instance"}
    (out / "recipe.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))
    start, log = time.perf_counter(), RunLog(out / "log.txt", progress)
    torch.manual_seed(r.seed)
    torch.set_num_threads(r.threads)
    train, val, num_classes = instance_datasets(r)
    loader = make_instance_loader(train, batch_size=r.batch_size, shuffle=True, seed=r.seed, drop_last=True)
    model_kwargs = {"num_classes": num_classes, "width": r.width}
    model = create_model(r.model, **model_kwargs).to(r.device)
    if getattr(model, "task", None) != "instance":
        raise ValueError(f"{r.model} is not an instance segmentation model (try test_yolact, yolact_resnet50)")
    example = torch.zeros(1, 3, *r.size, device=r.device)
    groups = channel_groups(model, model.prune_inputs(example))
    histograms: list[list[int]] = []

    log(f"1/4 training {r.model} (width {r.width}) for {r.epochs} epochs on {r.data} instances; method {r.method} "
        f"(lam {r.lam})")

    def on_epoch(epoch: int, loss: float) -> None:
        histograms.append(gamma_histogram(model))
        log(f"    epoch {epoch + 1}/{r.epochs}: loss {loss:.4f}")

    train_slimming(r, model, loader, num_classes, groups, progress=progress, on_epoch=on_epoch)
    log(f"    |gamma| histogram after training: {histograms[-1] if histograms else []}")
    before = measure_instances(model, val, example, batch_size=r.batch_size, device=r.device)
    log(f"    box AP {before['box_ap']:.4f}, mask AP {before['mask_ap']:.4f}")

    log(f"2/4 pruning {r.ratio:.0%} of the BN-scored channels (one global |gamma| threshold), 3/4 fine-tuning "
        f"{r.finetune_epochs} epochs")
    result = prune(model.eval(), model.prune_inputs(example), criterion="bn_scale", ratio=r.ratio,
                   min_keep=r.min_keep, round_to=r.round_to or None, groups=groups)
    pruned = result.model.train()
    scored = sum(int(g.prunable.sum()) for g in groups if not g.frozen and bn_scale(g, model) is not None)
    log(f"    removed {result.channels_removed} of {scored} BN-scored prunable channels")
    finetune(r, pruned, loader, num_classes, progress=progress)
    categories = (val.dataset if isinstance(val, Subset) else val).categories
    config = {"model": r.model, "model_kwargs": model_kwargs, "recipe": plain, "task": "instance",
              "categories": categories}
    checkpoint.save(out / "pruned", pruned, plan=result.plan, config=config)

    log("4/4 fusing Conv+BN and measuring (latency interleaved before/after)")
    deployed = fuse_conv_bn(deployable(pruned), example)
    after = measure_instances(deployed, val, example, batch_size=r.batch_size, device=r.device)
    latency = compare_latency({"before": deployable(model), "after": deployed}, example, threads=r.threads,
                              rounds=r.latency_rounds, runs=r.latency_runs)
    for side, row in (("before", before), ("after", after)):
        row["latency_ms"], row["latency"] = latency[side]["median_ms"], latency[side]
    report = {"title": f"{r.name}: {r.model} ({r.method}, instance)", "task": "instance", "recipe": plain,
              "seconds": time.perf_counter() - start, "before": before, "after": after,
              "pruning": {"removed_channels": result.channels_removed, "prunable_channels": scored,
                          "removed_fraction": result.channels_removed / max(scored, 1),
                          "prunable_channels_all": result.channels_prunable, "groups": len(groups),
                          "criterion": "bn_scale", "scope": "BN-scored groups (the backbone)"},
              "gamma_histograms": histograms, "notes": _notes(r), "widths": layer_widths(model, pruned, groups)}
    write_report(out, report)
    log(table(before, after, rows=INSTANCE_ROWS))
    log(f"done in {report['seconds']:.0f} s: {out / 'report.md'}")
    return report


def _notes(r: Recipe) -> list[str]:
    return [f"before = the model as trained ({r.epochs} epochs, method {r.method}, lam {r.lam}, unfused); after = "
            f"pruned, fine-tuned {r.finetune_epochs} more epochs, Conv+BN fused: part of its AP change is that extra "
            "training.",
            f"Box and mask AP, AP50, AP75: pycocotools COCOeval on {r.val_samples} {r.data} validation images at "
            f"{r.size[0]}x{r.size[1]}.",
            "Only the backbone has BatchNorm, so the |gamma| threshold prunes backbone channels (the seed's scope); "
            "the FPN's laterals lose input channels with them.",
            f"Cost of the deployable model (semantic auxiliary head dropped, before and after): MACs = FLOPs / 2 for "
            f"one 1x3x{r.size[0]}x{r.size[1]} input (torch.utils.flop_counter); weights file = safetensors bytes."]
