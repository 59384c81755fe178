"""Validation scores that the engine's structural methods take as callables (the engine never imports eval/):
`miou_metric` for block pruning (:func:`segprune.prune.prune_blocks`), `val_miou` for post-pruning
(:func:`segprune.prune.pruning_path`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segprune._utils import eval_mode
from segprune.eval.metrics import ConfusionMatrix, evaluate, predict


def miou_metric(num_classes: int) -> Callable[[nn.Module, Sequence], float]:
    """`metric(model, batches)` = -mIoU (lower is better, like a loss), so a block's score is the IoU it costs."""
    def metric(model: nn.Module, batches) -> float:
        device = next(model.parameters()).device
        return -evaluate(model, list(batches), num_classes=num_classes, device=device)["miou"]

    return metric


def val_miou(loader, num_classes: int, *, device="cpu") -> Callable[[nn.Module], dict]:
    """A `val_fn`: the dataset mIoU of `loader` plus every image's own mIoU (for the 1-SE rule)."""
    def fn(model: nn.Module) -> dict:
        total, per_image = ConfusionMatrix(num_classes), []
        with eval_mode(model), torch.inference_mode():
            for images, targets in loader:
                logits = predict(model, images.to(device))
                if logits.shape[-2:] != targets.shape[-2:]:
                    logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
                total.update(logits, targets.to(device))
                for lg, tg in zip(logits, targets.to(device)):
                    one = ConfusionMatrix(num_classes)
                    one.update(lg[None], tg[None])
                    per_image.append(one.compute()["miou"])
        return {"miou": total.compute()["miou"], "per_image": per_image}

    return fn
