"""One Task interface for what differs between semantic and instance segmentation; the runs are written once.

A task says how a recipe's data becomes loaders, what the training loss is, what the engine traces (YOLACT's
``prune_inputs`` couple prototypes to mask coefficients), how a model is evaluated, what is deployed (YOLACT drops
its training-only semantic head) and which rows its report shows. A new task is one class here and one entry in
:data:`TASKS`.
"""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from segprune._utils import IGNORE_INDEX, eval_mode, unwrap
from segprune.data import make_loader
from segprune.data.instances import make_instance_loader
from segprune.data.loader import size_groups, size_tolerant
from segprune.eval.instances import evaluate_model
from segprune.eval.metrics import evaluate, predict
from segprune.models.yolact_loss import InstanceLoss, YolactLoss
from segprune.report.common import INSTANCE_ROWS, ROWS
from segprune.train.distributed import ShardSampler
from segprune.train.loop import SegmentationLoss
from segprune.workflows.data import base_dataset, class_names, instance_datasets, semantic_loaders

AP_KEYS = {"AP": "ap", "AP50": "ap50", "AP75": "ap75"}


class Task:
    """What a run needs to know about its kind of segmentation."""

    name = ""
    rows = ROWS  # the report's before/after table
    methods: tuple[str, ...] | None = None  # the methods it supports (None: all)
    unsupported: tuple[str, ...] = ()  # recipe settings it refuses when they differ from the default

    def check(self, r, *, compress: bool = True) -> None:
        """Refuse a recipe this task cannot run (its compression run, or only its training), naming the setting."""
        if compress and self.methods is not None and r.method not in self.methods:
            raise ValueError(f"{self.name} runs support method {' or '.join(self.methods)}, got {r.method!r}")
        defaults = type(r)()
        for key in self.unsupported:
            if getattr(r, key) != getattr(defaults, key):
                raise ValueError(f"{self.name} runs do not support {key} (got {getattr(r, key)!r})")

    def check_model(self, model: nn.Module, name: str) -> None:
        """Refuse a model of the other task."""

    def loaders(self, r) -> tuple:
        """(train loader, validation data for :meth:`evaluate`, number of classes), one process."""
        raise NotImplementedError

    def shard_loaders(self, r, world: int, rank: int) -> tuple:
        """The same for one rank of ``world`` processes: the training shard of a global batch of
        ``r.batch_size``."""
        raise NotImplementedError

    def loss(self, r, model: nn.Module, train_loader):
        """The training loss ``loss(output, targets)``."""
        raise NotImplementedError

    def prune_inputs(self, model: nn.Module, example: torch.Tensor):
        """What the engine traces the model with."""
        return model.prune_inputs(example) if hasattr(model, "prune_inputs") else example

    def evaluate(self, model: nn.Module, val, r, *, num_classes: int, device, all_reduce: bool = False) -> dict:
        """Accuracy of ``model`` on ``val``: a flat dict holding the report rows' accuracy keys."""
        raise NotImplementedError

    def summary(self, metrics: dict) -> str:
        """The accuracy as one log line."""
        raise NotImplementedError

    def deployable(self, model: nn.Module) -> nn.Module:
        """The model that is measured and exported (training-only parts dropped)."""
        return model

    def config(self, r, model_kwargs: dict, val, plain: dict) -> dict:
        """A checkpoint's config."""
        return {"model": r.model, "model_kwargs": model_kwargs, "recipe": plain}

    def samples(self, before, after, val, r, num_classes: int):
        """Validation images with both models' predictions for the report, or None."""
        return None


class SemanticTask(Task):
    """Per-pixel classes: cross-entropy (optionally class-weighted), mIoU from a confusion matrix."""

    name = "semantic"

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

    def samples(self, before, after, val, r, num_classes):
        return sample_predictions(before, after, val, r.report_samples, num_classes)

    def config(self, r, model_kwargs, val, plain):
        """Also the class names (for `segprune predict` and reports), where the data has them."""
        names = class_names(val)
        return {**super().config(r, model_kwargs, val, plain), **({"class_names": names} if names else {})}


class InstanceTask(Task):
    """Objects: YOLACT's detection loss, COCO box and mask AP; the seed's method (slimming of the backbone)."""

    name = "instance"
    rows = INSTANCE_ROWS
    methods = ("slimming", "bn_scale")
    unsupported = ("schedule", "iterations", "layer_pruning", "slim_widths", "aux_layers", "kd_alpha",
                   "class_weights")

    def check(self, r, *, compress=True):
        """Also: pycocotools, which the AP needs, must be installed before any training starts."""
        super().check(r, compress=compress)
        if importlib.util.find_spec("pycocotools") is None:
            raise ValueError("instance runs measure box and mask AP with pycocotools, which is not installed: "
                             "pip install 'segprune[coco]' (or segprune[all])")

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

    def deployable(self, model):
        """A copy without YOLACT's training-only semantic head."""
        out = copy.deepcopy(model)
        if getattr(out, "seg_head", None) is not None:
            out.seg_head = None
        return out.eval()

    def config(self, r, model_kwargs, val, plain):
        return {**super().config(r, model_kwargs, val, plain), "task": "instance",
                "categories": base_dataset(val).categories}


TASKS: dict[str, Task] = {t.name: t for t in (SemanticTask(), InstanceTask())}


def task_of(name: str) -> Task:
    """The task called ``name``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


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
