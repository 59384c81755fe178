"""One training loop for training, sparsity training and fine-tuning.

The step is deliberately explicit: ``loss.backward()``, then the optional regulariser (which edits
``.grad``, e.g. ``gamma.grad += lam * sign(gamma)``), then ``optimizer.step()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def _fit_to(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Resize logits bilinearly to the target's spatial size when they differ (aux heads often do)."""
    if logits.shape[-2:] == target.shape[-2:]:
        return logits
    return F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)


def segmentation_loss(output, target: torch.Tensor, *, criterion: Callable, aux_weight: float = 0.4) -> torch.Tensor:
    """Main loss plus ``aux_weight`` times the loss of every auxiliary output.

    Args:
        output: Logits, or a dict with ``"out"`` and optionally ``"aux"`` (a tensor or a list of them).
        target: Target labels (N, H, W).
        criterion: Loss of (logits, target).
        aux_weight: Weight of each auxiliary loss.

    Returns:
        The scalar loss.
    """
    if not isinstance(output, dict):
        return criterion(_fit_to(output, target), target)
    loss = criterion(_fit_to(output["out"], target), target)
    aux = output.get("aux")
    for logits in [] if aux is None else aux if isinstance(aux, (list, tuple)) else [aux]:
        loss = loss + aux_weight * criterion(_fit_to(logits, target), target)
    return loss


def train_step(model, images, targets, optimizer, *, criterion: Callable, aux_weight=0.4, regularizer=None,
               extra_loss=None) -> float:
    """One optimisation step: forward, ``loss.backward()``, ``regularizer(model)``, ``optimizer.step()``.

    ``extra_loss(images, output)``, when given, is added to the loss (e.g. distillation from a teacher).

    Returns:
        The loss of the batch.
    """
    optimizer.zero_grad(set_to_none=True)
    output = model(images)
    loss = segmentation_loss(output, targets, criterion=criterion, aux_weight=aux_weight)
    if extra_loss is not None:
        loss = loss + extra_loss(images, output)
    loss.backward()
    if regularizer is not None:  # it edits .grad, so it must come after backward and before step
        regularizer(model)
    optimizer.step()
    return loss.item()


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    *,
    criterion: Callable | None = None,
    aux_weight: float = 0.4,
    scheduler=None,
    regularizer: Callable[[nn.Module], None] | None = None,
    extra_loss: Callable | None = None,
    device="cpu",
    progress: bool = True,
    desc: str = "train",
) -> float:
    """Train ``model`` for one pass over ``loader``.

    Args:
        model: Returns logits or a dict with ``"out"`` and, in training, optionally ``"aux"``.
        loader: Iterable of (images, targets) batches.
        optimizer: Optimiser over the model's parameters.
        criterion: Loss of (logits, target); defaults to cross-entropy ignoring label 255.
        aux_weight: Weight of each auxiliary loss.
        scheduler: Learning-rate scheduler, stepped after every iteration.
        regularizer: Called as ``regularizer(model)`` between ``backward()`` and ``step()``; it edits ``.grad``.
        extra_loss: ``extra_loss(images, output)`` added to the loss (see ``segprune.train.distill``).
        device: Device to move batches to; the model must already be there.
        progress: Show a tqdm bar with the running loss.
        desc: Label of the progress bar.

    Returns:
        The mean of the per-iteration losses.
    """
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss(ignore_index=255)
    model.train()
    total, steps = 0.0, 0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False)
    for images, targets in bar:
        batch = images.to(device), targets.to(device)
        loss = train_step(model, *batch, optimizer, criterion=criterion, aux_weight=aux_weight, regularizer=regularizer,
                          extra_loss=extra_loss)
        if scheduler is not None:
            scheduler.step()
        total, steps = total + loss, steps + 1
        bar.set_postfix(loss=f"{total / steps:.4f}")
    return total / max(steps, 1)


def poly_lr(optimizer: torch.optim.Optimizer, *, total_iters: int, power: float = 0.9):
    """Polynomial decay ``(1 - it / total_iters) ** power``, to be stepped once per iteration.

    Returns:
        A :class:`torch.optim.lr_scheduler.LambdaLR`; the factor stays 0 after ``total_iters``.
    """
    if total_iters <= 0:
        raise ValueError(f"total_iters must be positive, got {total_iters}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: (1 - min(it, total_iters) / total_iters) ** power)


def make_optimizer(model: nn.Module, *, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4):
    """SGD with momentum (``name="sgd"``) or AdamW (``name="adamw"``) over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")


def fit(
    model: nn.Module,
    train_loader,
    *,
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    optimizer: str = "sgd",
    regularizer: Callable[[nn.Module], None] | None = None,
    extra_loss: Callable | None = None,
    aux_weight: float = 0.4,
    device="cpu",
    progress: bool = True,
    desc: str = "train",
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train for ``epochs`` epochs with SGD (or AdamW) and a per-iteration poly learning-rate decay.

    Args:
        model: Model to train in place; it is moved to ``device``.
        train_loader: Iterable of (images, targets) batches with a length.
        epochs: Number of passes over ``train_loader``.
        lr: Initial learning rate.
        momentum: SGD momentum (unused by AdamW).
        weight_decay: Weight decay.
        optimizer: ``"sgd"`` or ``"adamw"``.
        regularizer: See :func:`train_one_epoch`.
        extra_loss: See :func:`train_one_epoch`.
        on_epoch: Called as ``on_epoch(epoch, mean_loss)`` after every epoch (logging, histograms).
        aux_weight: Weight of each auxiliary loss.
        device: Device to train on.
        progress: Show progress bars.
        desc: Prefix of the progress bar labels.

    Returns:
        The mean loss of every epoch.
    """
    model.to(device)
    opt = make_optimizer(model, name=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = poly_lr(opt, total_iters=max(epochs * len(train_loader), 1))
    kwargs = dict(aux_weight=aux_weight, scheduler=scheduler, regularizer=regularizer, extra_loss=extra_loss,
                  device=device, progress=progress)
    losses = []
    for epoch in range(epochs):
        losses.append(train_one_epoch(model, train_loader, opt, desc=f"{desc} {epoch + 1}/{epochs}", **kwargs))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    return losses
