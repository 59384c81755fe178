"""One training loop for training, sparsity training and fine-tuning.

The step is deliberately explicit: ``loss.backward()``, then the optional regulariser (which edits
``.grad``, e.g. ``gamma.grad += lam * sign(gamma)``), then ``optimizer.step()``. With gradient accumulation the
backward passes of ``accumulate`` batches add up first and the regulariser runs once, right before the step;
with mixed precision the forward pass runs under ``torch.autocast`` and float16 losses go through a GradScaler
(unscaled before the regulariser sees the gradients). :func:`fit` adds the poly LR schedule, resumable
checkpoints (:mod:`segprune.train.resume`), a CSV/TensorBoard log and DDP (:mod:`segprune.train.distributed`).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from segprune._utils import IGNORE_INDEX, deprecated, unwrap
from segprune.train.distributed import is_main, mean_across
from segprune.train.log import EpochLog
from segprune.train.resume import Checkpoints, Progress, epoch_batches


def _fit_to(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Resize logits bilinearly to the target's spatial size when they differ (aux heads often do)."""
    if logits.shape[-2:] == target.shape[-2:]:
        return logits
    return F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)


class SegmentationLoss:
    """``loss(output, target)`` of a segmentation model: ``pixel_loss`` on the main logits plus ``aux_weight`` times
    it on every auxiliary output (resized to the target). The default ``pixel_loss`` is cross-entropy ignoring
    ``IGNORE_INDEX``.

    The training loop takes one ``loss(output, targets)``; a segmentation model's is this, an instance model's is
    its detection loss (e.g. :class:`segprune.models.yolact_loss.InstanceLoss`).
    """

    def __init__(self, pixel_loss: Callable | None = None, *, aux_weight: float = 0.4):
        self.pixel_loss = pixel_loss if pixel_loss is not None else nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
        self.aux_weight = aux_weight

    def __call__(self, output, target: torch.Tensor) -> torch.Tensor:
        return segmentation_loss(output, target, criterion=self.pixel_loss, aux_weight=self.aux_weight)


def segmentation_loss(output, target: torch.Tensor, *, criterion: Callable, aux_weight: float = 0.4) -> torch.Tensor:
    """Main loss plus ``aux_weight`` times the loss of every auxiliary output.

    Args:
        output: Logits, or a dict with ``"out"`` and optionally ``"aux"`` (a tensor or a list of them).
        target: Target labels (N, H, W).
        criterion: Pixel loss of (logits, target).
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


def train_step(model, images, targets, optimizer, *, loss: Callable | None = None, regularizer=None,
               extra_loss=None, criterion: Callable | None = None, aux_weight: float = 0.4) -> float:
    """One optimisation step: forward, ``loss.backward()``, ``regularizer(model)``, ``optimizer.step()``.

    ``extra_loss(images, output)``, when given, is added to the loss (e.g. distillation from a teacher).
    ``criterion``/``aux_weight``: the older spelling of ``loss=SegmentationLoss(criterion, aux_weight=...)``.

    Returns:
        The loss of the batch.
    """
    optimizer.zero_grad(set_to_none=True)
    value = backward(model, images, targets, loss=resolve_loss(loss, criterion, None, aux_weight),
                     extra_loss=extra_loss)
    optimizer_step(model, optimizer, regularizer=regularizer)
    return value


def backward(model, images, targets, *, loss: Callable, extra_loss=None, scale: float = 1.0,
             amp_dtype: torch.dtype | None = None, scaler=None) -> float:
    """Forward (under autocast when ``amp_dtype`` is given) and ``backward()`` of ``scale`` times the loss.

    Gradients add up in ``.grad``: with ``scale = 1 / k`` over k batches they are those of the mean loss.

    Returns:
        The (unscaled) loss of the batch.
    """
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        output = model(images)
        value = loss(output, targets)
        if extra_loss is not None:
            value = value + extra_loss(images, output)
    scaled = value * scale if scale != 1 else value
    (scaled if scaler is None else scaler.scale(scaled)).backward()
    return value.item()


def resolve_loss(loss: Callable | None, criterion: Callable | None, loss_fn: Callable | None,
                 aux_weight: float = 0.4) -> Callable:
    """The one ``loss(output, targets)`` of a run, from ``loss`` or the older keywords: ``criterion`` (a pixel loss
    of (logits, target), wrapped in :class:`SegmentationLoss` with ``aux_weight``) or ``loss_fn``."""
    if sum(x is not None for x in (loss, criterion, loss_fn)) > 1:
        raise ValueError("give one of loss=, criterion= (pixel loss) or loss_fn= (the older name of loss=)")
    if criterion is not None or loss_fn is not None:
        deprecated(f"fit({'criterion' if criterion is not None else 'loss_fn'}=...)",
                   "pass loss=SegmentationLoss(criterion) or loss=your_loss", stacklevel=3)
    if loss_fn is not None:
        return loss_fn
    if loss is None or criterion is not None:
        return SegmentationLoss(criterion, aux_weight=aux_weight)
    return loss


def optimizer_step(model, optimizer, *, regularizer=None, scaler=None) -> None:
    """``regularizer(model)`` on the true gradients, then ``optimizer.step()`` (through ``scaler``), zero grads."""
    if scaler is not None:
        scaler.unscale_(optimizer)  # the regulariser adds to true gradients, not to loss-scaled ones
    if regularizer is not None:  # it edits .grad, so it must come after backward and before step
        regularizer(unwrap(model))
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)


def to_device(targets, device):
    """Targets on ``device``: a tensor, or a list of dicts (instance targets; values that are no tensor stay)."""
    if isinstance(targets, torch.Tensor):
        return targets.to(device)
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    *,
    loss: Callable | None = None,
    scheduler=None,
    regularizer: Callable[[nn.Module], None] | None = None,
    extra_loss: Callable | None = None,
    device="cpu",
    progress: bool = True,
    desc: str = "train",
    accumulate: int = 1,
    amp_dtype: torch.dtype | None = None,
    scaler=None,
    start: int = 0,
    on_batch: Callable[[int, float, bool], None] | None = None,
) -> float:
    """Train ``model`` for one pass over ``loader``.

    A model in eval mode is put in training mode; one already training is left as it is, so submodules its user
    froze in eval mode (a pretrained stem's BatchNorm) stay frozen.

    Args:
        model: Returns logits or a dict with ``"out"`` and, in training, optionally ``"aux"``.
        loader: Iterable of (images, targets) batches.
        optimizer: Optimiser over the model's parameters.
        loss: ``loss(output, targets)``; by default :class:`SegmentationLoss` (cross-entropy ignoring
            ``IGNORE_INDEX`` on the main and auxiliary logits). Targets may be a list of dicts (instance models).
        scheduler: Learning-rate scheduler, stepped after every optimizer step.
        regularizer: Called as ``regularizer(model)`` between ``backward()`` and ``step()``; it edits ``.grad``.
        extra_loss: ``extra_loss(images, output)`` added to the loss (see ``segprune.train.distill``).
        device: Device to move batches to; the model must already be there.
        progress: Show a tqdm bar with the running loss (on a terminal only, see :func:`show_bar`).
        desc: Label of the progress bar.
        accumulate: Step the optimizer every ``accumulate`` batches, on the gradient of their mean loss (the last
            group of an epoch may be shorter; it is averaged over its own size).
        amp_dtype: Run forward passes under ``torch.autocast`` in this dtype (None: full precision).
        scaler: A ``GradScaler`` for float16 (None: no loss scaling).
        start: Batches of the epoch already done before ``loader`` (a resumed epoch); a multiple of ``accumulate``.
        on_batch: Called as ``on_batch(index, loss, stepped)`` after every batch (``index`` counts from the
            epoch's start; ``stepped`` says whether the optimizer stepped), e.g. to write checkpoints.

    Returns:
        The mean of the per-iteration losses.
    """
    loss = loss if loss is not None else SegmentationLoss()
    if not model.training:  # a training model keeps the modes its user chose (a BatchNorm frozen in eval mode)
        model.train()
    optimizer.zero_grad(set_to_none=True)
    total, steps, length = 0.0, 0, start + len(loader)
    bar = tqdm(loader, desc=desc, disable=not show_bar(progress), leave=False)
    for index, (images, targets) in enumerate(bar, start=start):
        group = min(accumulate, length - index // accumulate * accumulate)
        stepping = (index + 1) % accumulate == 0 or index + 1 == length
        with contextlib.nullcontext() if stepping or not hasattr(model, "no_sync") else model.no_sync():
            value = backward(model, images.to(device), to_device(targets, device), loss=loss,
                             extra_loss=extra_loss, scale=1 / group, amp_dtype=amp_dtype, scaler=scaler)
        if stepping:
            optimizer_step(model, optimizer, regularizer=regularizer, scaler=scaler)
            if scheduler is not None:
                scheduler.step()
        total, steps = total + value, steps + 1
        bar.set_postfix(loss=f"{total / steps:.4f}")
        if on_batch is not None:
            on_batch(index, value, stepping)
    return total / max(steps, 1)


def show_bar(progress: bool) -> bool:
    """Whether to draw a progress bar: when asked and stderr is a terminal. In a log file or a pipe every redraw
    of a bar is one more carriage-return frame; there, the per-epoch line the caller prints is the progress."""
    return progress and sys.stderr.isatty()


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


def steps_per_epoch(batches: int, accumulate: int = 1) -> int:
    """Optimizer steps in an epoch of ``batches`` batches (a last, shorter group also steps)."""
    return math.ceil(batches / accumulate)


def amp_settings(amp: bool, amp_dtype: str | None, device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """The autocast dtype and GradScaler of a run.

    On CUDA ``amp`` means float16 with a GradScaler (or bfloat16 without one, when asked). On CPU only bfloat16
    exists, and it changes results enough that it runs only when asked for by name.
    """
    if not amp:
        return None, None
    kind = torch.device(device).type
    name = amp_dtype or ("float16" if kind == "cuda" else None)
    if name not in ("float16", "bfloat16"):
        raise ValueError(f"amp_dtype must be 'float16' or 'bfloat16', got {amp_dtype!r}" if amp_dtype else
                         "mixed precision on CPU runs in bfloat16 only, when asked: pass amp_dtype='bfloat16'")
    if kind != "cuda" and name == "float16":
        raise ValueError(f"float16 autocast needs CUDA; on {kind} pass amp_dtype='bfloat16'")
    dtype = getattr(torch, name)
    return dtype, torch.amp.GradScaler(kind) if dtype == torch.float16 else None


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
    accumulate: int = 1,
    amp: bool = False,
    amp_dtype: str | None = None,
    checkpoints: Checkpoints | None = None,
    resume: bool = False,
    log_dir: str | Path | None = None,
    loss: Callable | None = None,
    validate: Callable[[nn.Module], float] | None = None,
    criterion: Callable | None = None,
    loss_fn: Callable | None = None,
) -> list[float]:
    """Train for ``epochs`` epochs with SGD (or AdamW) and a per-step poly learning-rate decay.

    Args:
        model: Model to train in place (or DistributedDataParallel around it); it is moved to ``device``.
        train_loader: Iterable of (images, targets) batches with a length; a ``DistributedSampler`` in it gets
            ``set_epoch`` every epoch.
        epochs: Number of passes over ``train_loader``.
        lr: Initial learning rate.
        momentum: SGD momentum (unused by AdamW).
        weight_decay: Weight decay.
        optimizer: ``"sgd"`` or ``"adamw"``.
        regularizer: See :func:`train_one_epoch`.
        extra_loss: See :func:`train_one_epoch`.
        aux_weight: Weight of each auxiliary loss.
        device: Device to train on.
        progress: Show progress bars.
        desc: Prefix of the progress bar labels.
        on_epoch: Called as ``on_epoch(epoch, mean_loss)`` after every epoch (logging, histograms).
        validate: ``validate(model) -> float`` after every epoch (e.g. validation mIoU; on every rank under DDP),
            recorded as the epoch's ``val_miou`` in the history, ``train.csv`` and the checkpoints.
        loss: ``loss(output, targets)`` (see :func:`train_one_epoch`); by default cross-entropy ignoring
            ``IGNORE_INDEX`` on the main logits plus ``aux_weight`` times it on each auxiliary output.
        criterion: Deprecated: a pixel loss of (logits, target), as ``loss=SegmentationLoss(criterion)``.
        loss_fn: Deprecated name of ``loss``.
        accumulate: Step the optimizer every ``accumulate`` batches (see :func:`train_one_epoch`).
        amp: Mixed precision, see :func:`amp_settings`.
        amp_dtype: ``"float16"`` or ``"bfloat16"``; None is float16 on CUDA and an error on CPU.
        checkpoints: Write training checkpoints there (every ``checkpoints.every`` steps and at epoch ends).
        resume: Continue from the newest of ``checkpoints`` (from scratch when there is none).
        log_dir: Write ``train.csv`` (epoch, step, loss, lr, seconds) there, and TensorBoard events when
            ``torch.utils.tensorboard`` imports. Only rank 0 writes logs and checkpoints.

    Returns:
        The mean loss of every epoch (over all ranks), those before a resume included.
    """
    if accumulate < 1:
        raise ValueError(f"accumulate must be >= 1, got {accumulate}")
    model.to(device)
    opt = make_optimizer(model, name=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = poly_lr(opt, total_iters=max(epochs * steps_per_epoch(len(train_loader), accumulate), 1))
    dtype, scaler = amp_settings(amp, amp_dtype, device)
    objects = dict(model=model, optimizer=opt, scheduler=scheduler, scaler=scaler, regularizer=regularizer,
                   loader=train_loader)
    state = (checkpoints.restore(**objects) if checkpoints is not None and resume else None) or Progress()
    log = EpochLog(log_dir) if log_dir is not None and is_main() else None
    kwargs = dict(scheduler=scheduler, regularizer=regularizer, extra_loss=extra_loss, device=device,
                  progress=progress, accumulate=accumulate, amp_dtype=dtype, scaler=scaler,
                  loss=resolve_loss(loss, criterion, loss_fn, aux_weight))
    try:
        while state.epoch < epochs:
            _epoch(state, objects, checkpoints, desc=f"{desc} {state.epoch + 1}/{epochs}", validate=validate,
                   **kwargs)
            if log is not None:
                log.write(state.history)
            if on_epoch is not None:
                on_epoch(state.epoch - 1, state.history[-1]["loss"])
    finally:
        if log is not None:
            log.close()
    return [row["loss"] for row in state.history]


def _isolated(validate: Callable, model: nn.Module) -> float:
    """``validate(model)`` with the global RNG states put back afterwards: a DataLoader draws its base seed from
    them even without workers, and training must go on exactly as it would without validation."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        return float(validate(model))


def _epoch(state: Progress, objects: dict, checkpoints: Checkpoints | None, *, validate=None, **kwargs) -> None:
    """One epoch (or the rest of one) from ``state``; checkpoints when due and at the end, which advances ``state``."""
    model, opt, loader = objects["model"], objects["optimizer"], objects["loader"]
    batches, start = epoch_batches(loader, state.epoch, state), state.batch
    clock = time.perf_counter() - state.seconds

    def on_batch(index: int, loss: float, stepped: bool) -> None:
        state.batch, state.loss_sum, state.step = index + 1, state.loss_sum + loss, state.step + stepped
        if stepped and checkpoints is not None and checkpoints.due(state.step) and state.batch < len(loader):
            state.seconds = time.perf_counter() - clock
            checkpoints.save(state, **objects)

    train_one_epoch(model, batches, opt, start=start, on_batch=on_batch, **kwargs)
    loss = mean_across(state.loss_sum / max(state.batch, 1))
    state.history.append(dict(epoch=state.epoch + 1, step=state.step, loss=loss, lr=opt.param_groups[0]["lr"],
                              seconds=time.perf_counter() - clock))
    if validate is not None:  # before the checkpoint, so a resumed run's history has it too
        state.history[-1]["val_miou"] = _isolated(validate, unwrap(model))
    state.epoch, state.batch, state.loss_sum, state.seconds = state.epoch + 1, 0, 0.0, 0.0
    if checkpoints is not None:
        checkpoints.save(state, **objects)
