"""One Task interface for what differs between semantic and instance segmentation; the runs are written once.

A task says how a recipe's data becomes loaders, what the training loss is, what the engine traces (YOLACT's
``prune_inputs`` couple prototypes to mask coefficients), how a model is evaluated, what is deployed (YOLACT drops
its training-only semantic head), what its report records and shows, and its demo. The interface and the registry
are in :mod:`segprune.workflows.taskbase`; a new task is one :class:`Task` subclass and one :func:`register_task`
call (see ARCHITECTURE.md, "Adding a task").
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from segprune import checkpoint
from segprune._utils import IGNORE_INDEX, eval_mode, unwrap
from segprune.data import make_loader
from segprune.data.instances import make_instance_loader
from segprune.data.loader import size_groups, size_tolerant
from segprune.eval.instances import evaluate_model
from segprune.eval.metrics import evaluate, predict
from segprune.models.yolact_loss import InstanceLoss, YolactLoss
from segprune.prune.criteria import bn_scale
from segprune.train.distributed import ShardSampler
from segprune.train.loop import SegmentationLoss
from segprune.workflows.data import (
    base_dataset,
    class_names,
    evaluation_dataset,
    instance_dataset,
    instance_datasets,
    semantic_loaders,
)
from segprune.workflows.methods import method
from segprune.workflows.recipe import Recipe
from segprune.workflows.taskbase import DEFAULT_TASK, TASKS, Task, recorded_task, register_task, task_of

__all__ = ["DEFAULT_TASK", "TASKS", "InstanceTask", "SemanticTask", "Task", "recorded_task", "register_task",
           "task_of"]

AP_KEYS = {"AP": "ap", "AP50": "ap50", "AP75": "ap75"}


class SemanticTask(Task):
    """Per-pixel classes: cross-entropy (optionally class-weighted), mIoU from a confusion matrix."""

    name = "semantic"
    accuracy_name = "mIoU"
    epoch_metric = "miou"
    per_pixel = True

    def record(self):
        """Nothing: semantic reports and checkpoints record no task, as before tasks (the default)."""
        return {}

    def title(self, r):
        return f"{r.name}: {r.model} ({r.method})"

    def notes(self, r):
        return [f"mIoU on the {r.data} {r.val_split} split; MACs = FLOPs / 2 for one "
                f"1x3x{r.size[0]}x{r.size[1]} input (torch.utils.flop_counter)."]

    def loaders(self, r):
        return semantic_loaders(r)

    def shard_loaders(self, r, world: int, rank: int):
        train, val, num_classes = semantic_loaders(r)
        # The same sampler for 1 or N processes, so both see the same global batches.
        train = make_loader(train.dataset, batch_size=r.batch_size // world, shuffle=True, seed=r.seed,
                            drop_last=True, num_workers=r.num_workers, distributed=True, num_replicas=world,
                            rank=rank)
        val = DataLoader(val.dataset, batch_size=r.batch_size, sampler=ShardSampler(len(val.dataset)),
                         num_workers=r.num_workers)
        return train, val, num_classes

    def pixel_loss(self, r, train_loader) -> nn.Module:
        """Cross-entropy ignoring void, weighted by the dataset's ``class_weights`` when the recipe asks for it."""
        weights = getattr(base_dataset(train_loader.dataset), "class_weights", None) if r.class_weights else None
        if r.class_weights and weights is None:
            raise ValueError(f"class_weights: the {r.data} dataset has no class weights")
        weight = None if weights is None else torch.as_tensor(weights, dtype=torch.float32, device=r.device)
        return nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE_INDEX)

    def loss(self, r, model, train_loader):
        return SegmentationLoss(self.pixel_loss(r, train_loader))

    def evaluate(self, model, val, r, *, num_classes, device, all_reduce=False):
        """mIoU, per-class IoU, accuracies and, for two-class (person) data, the foreground IoU."""
        return evaluate(model, val, num_classes=num_classes, device=device, all_reduce=all_reduce)

    def summary(self, metrics):
        fg = f", foreground IoU {metrics['fg_iou']:.4f}" if "fg_iou" in metrics else ""
        return f"mIoU {metrics['miou']:.4f}{fg}"

    def change(self, before, after):
        fg = [f"foreground IoU {before['fg_iou']:.4f} -> {after['fg_iou']:.4f}"] if "fg_iou" in after else []
        return [f"mIoU {before['miou']:.4f} -> {after['miou']:.4f}", *fg]  # fg: a binary (person) dataset

    def evaluate_checkpoint(self, folder, config, data, *, split, samples, batch_size, eval_size, device,
                            **predict_kwargs):
        """mIoU, per-class IoU and accuracies (``predict_kwargs``: crop, stride, flip for sliding windows and flip
        testing)."""
        dataset = evaluation_dataset(data, config, split=split, samples=samples, eval_size=eval_size)
        num_classes = config.get("model_kwargs", {}).get("num_classes", dataset.num_classes)
        if dataset.num_classes != num_classes:
            raise ValueError(f"the model predicts {num_classes} classes, the {data} data has {dataset.num_classes}")
        names = getattr(dataset, "class_names", None) or [str(k) for k in range(num_classes)]
        if samples:
            dataset = Subset(dataset, range(min(samples, len(dataset))))
        model = checkpoint.load(folder).to(device)
        metrics = evaluate(model, DataLoader(dataset, batch_size=batch_size), num_classes=num_classes, device=device,
                           **predict_kwargs)
        return metrics, list(names)

    def samples(self, before, after, val, r, num_classes):
        return sample_predictions(before, after, val, r.report_samples, num_classes)

    def config(self, r, model_kwargs, val, plain):
        """Also the class names (for `segprune predict` and reports), where the data has them."""
        names = class_names(val)
        return {**super().config(r, model_kwargs, val, plain), **({"class_names": names} if names else {})}


class InstanceTask(Task):
    """Objects: YOLACT's detection loss, COCO box and mask AP; the seed's method (slimming of the backbone)."""

    name = "instance"
    accuracy_name = "AP"
    all_reduce_eval = False  # rank 0 alone: COCOeval needs every image's detections at once
    # The instance demo: about 2 minutes of CPU time. test_yolact at width 1/8 (FPN, protonet and head 32 channels
    # wide; the backbone stays test_yolact's 1/32), 4 object classes (num_classes counts the scenes' ground and sky).
    # YOLACT trained from scratch learns slowly: after these 800 steps its validation AP is about 8 % (box) and 6 %
    # (mask), seed 0; benchmarks/yolact.py trains a wider backbone for longer.
    demo = dict(name="instance-demo", task="instance", model="test_yolact", width=0.125, data="synthetic",
                num_classes=6, size=(96, 96), train_samples=160, val_samples=48, batch_size=8, epochs=40,
                optimizer="adamw", lr=0.003, method="slimming", lam=1e-4, ratio=0.5, min_keep=0.1,
                finetune_epochs=10, finetune_lr=0.001, latency_rounds=5, latency_runs=10)
    demo_out = "segprune-instance-demo"
    methods = ("slimming", "bn_scale")
    unsupported = ("schedule", "iterations", "layer_pruning", "slim_widths", "aux_layers", "kd_alpha",
                   "class_weights")

    def check(self, r, *, compress=True):
        """Also: pycocotools, which the AP needs, must be installed before any training starts."""
        super().check(r, compress=compress)
        if importlib.util.find_spec("pycocotools") is None:
            raise ValueError("instance runs measure box and mask AP with pycocotools, which is not installed: "
                             "pip install 'segprune[coco]' (or segprune[all])")

    def check_sparsity(self, r):
        if method(r.method).sparsity == "cap":
            raise ValueError("method cap is defined on semantic logits; train YOLACT with slimming (or none)")

    def check_model(self, model, name):
        if getattr(model, "task", None) != "instance":
            raise ValueError(f"{name} is not an instance segmentation model (try test_yolact, yolact_resnet50)")

    def loaders(self, r):
        train, val, num_classes = instance_datasets(r)
        return make_instance_loader(train, batch_size=r.batch_size, shuffle=True, seed=r.seed, drop_last=True,
                                    num_workers=r.num_workers), val, num_classes

    def shard_loaders(self, r, world, rank):
        train, val, num_classes = instance_datasets(r)
        loader = make_instance_loader(train, batch_size=r.batch_size // world, shuffle=True, seed=r.seed,
                                      drop_last=True, num_workers=r.num_workers, distributed=True,
                                      num_replicas=world, rank=rank)
        return loader, val, num_classes

    def loss(self, r, model, train_loader):
        return InstanceLoss(model, YolactLoss(model_classes(model)))

    def evaluate(self, model, val, r, *, num_classes, device, all_reduce=False):
        """COCO AP on rank 0's whole validation set (COCOeval needs every image's detections at once)."""
        metrics = evaluate_model(model, val, batch_size=r.batch_size, device=device)
        return {**ap_row(metrics), "coco": metrics}

    def summary(self, metrics):
        return f"box AP {metrics['box_ap']:.4f}, mask AP {metrics['mask_ap']:.4f}"

    def change(self, before, after):
        return [f"box AP {before['box_ap']:.4f} -> {after['box_ap']:.4f}, mask AP {before['mask_ap']:.4f} -> "
                f"{after['mask_ap']:.4f}"]

    def notes(self, r):
        return [f"Box and mask AP, AP50, AP75: pycocotools COCOeval on {r.val_samples} {r.data} validation images "
                f"at {r.size[0]}x{r.size[1]}.",
                "Only the backbone has BatchNorm, so the |gamma| threshold prunes backbone channels (the seed's "
                "scope); the FPN's laterals lose input channels with them.",
                f"Cost of the deployable model (semantic auxiliary head dropped, before and after): MACs = FLOPs / 2 "
                f"for one 1x3x{r.size[0]}x{r.size[1]} input (torch.utils.flop_counter); weights file = safetensors "
                "bytes."]

    def pruning_record(self, model, groups, removed, log=print):
        """Of the BN-scored groups (the backbone), the only ones the seed's method prunes."""
        prunable = sum(int(g.prunable.sum()) for g in groups)
        scored = sum(int(g.prunable.sum()) for g in groups if not g.frozen and bn_scale(g, model) is not None)
        log(f"    removed {removed} of {scored} BN-scored prunable channels")
        return {"removed_channels": removed, "prunable_channels": scored, "removed_fraction": removed / max(scored, 1),
                "prunable_channels_all": prunable, "groups": len(groups), "criterion": "bn_scale",
                "scope": "BN-scored groups (the backbone)"}

    def evaluate_checkpoint(self, folder, config, data, *, split, samples, batch_size, eval_size, device,
                            **predict_kwargs):
        """COCO box and mask AP, at the input size the checkpoint's recipe trained at; no class names."""
        r = {**dataclasses.asdict(Recipe()), **config.get("recipe", {})}
        num_classes = config["model_kwargs"]["num_classes"]
        dataset = instance_dataset(data, size=tuple(eval_size or r["size"]), seed=r["seed"], split=split,
                                   num_samples=samples or r["val_samples"], num_classes=num_classes)
        if dataset.num_classes != num_classes:
            raise ValueError(f"the model predicts {num_classes} classes, the {data} data has {dataset.num_classes}")
        if samples and len(dataset) > samples:
            dataset = Subset(dataset, range(samples))
        model = checkpoint.load(folder).to(device)
        recipe = dataclasses.replace(Recipe(), batch_size=batch_size)
        return self.evaluate(model, dataset, recipe, num_classes=num_classes, device=device), []

    def deployable(self, model):
        """A copy without YOLACT's training-only semantic head."""
        out = copy.deepcopy(model)
        if getattr(out, "seg_head", None) is not None:
            out.seg_head = None
        return out.eval()

    def config(self, r, model_kwargs, val, plain):
        return {**super().config(r, model_kwargs, val, plain), **self.record(),
                "categories": base_dataset(val).categories}


register_task(SemanticTask())
register_task(InstanceTask())


def model_classes(model: nn.Module) -> int:
    """The class count an instance model was built for."""
    return int(unwrap(model).num_classes)


def ap_row(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """COCOeval figures as flat keys: box_ap, box_ap50, box_ap75, mask_ap, mask_ap50, mask_ap75."""
    return {f"{prefix}_{short}": float(metrics[kind][name]) for kind, prefix in (("bbox", "box"), ("segm", "mask"))
            for name, short in AP_KEYS.items()}


@torch.no_grad()
def sample_predictions(before: nn.Module, after: nn.Module, loader, count: int, num_classes: int) -> dict | None:
    """The first ``count`` validation images, their targets and both models' predicted labels (the overlays)."""
    images, targets, count = [], [], max(count, 0)
    for batch in size_tolerant(loader):  # validation images may differ in size
        for x, y in size_groups(batch):
            images += list(x[: count - len(images)])
            targets += list(y[: count - len(targets)])
        if len(images) >= count:
            break
    if not images:
        return None
    preds = {"before": [], "after": []}
    for name, model in (("before", before), ("after", after)):
        device = next(model.parameters()).device
        with eval_mode(model):
            for x, y in zip(images, targets):
                logits = predict(model, x[None].to(device))
                if logits.shape[-2:] != y.shape[-2:]:
                    logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear")
                preds[name].append(logits.argmax(1)[0].cpu().numpy())
    dataset = base_dataset(loader.dataset)
    return {"images": [x.numpy() for x in images], "targets": [y.numpy() for y in targets], **preds,
            "num_classes": num_classes, "ignore_index": getattr(dataset, "ignore_index", IGNORE_INDEX),
            "class_names": list(getattr(dataset, "class_names", []))}


def gamma_histogram(model: nn.Module, bins: int = 10) -> list[int]:
    """Counts of |γ| over all BatchNorms in [0, max] (how sparse slimming made them)."""
    gammas = torch.cat([m.weight.detach().abs().flatten() for m in model.modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None])
    return np.histogram(gammas.cpu().numpy(), bins=bins, range=(0, float(gammas.max()) or 1.0))[0].tolist()
