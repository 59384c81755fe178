"""`segprune train` as a library function: a run folder with the resolved recipe, a log, a CSV, training
checkpoints for exact resume, the final model and its metrics; one process or one rank under torchrun.

The same for both tasks (:mod:`segprune.workflows.tasks`): a semantic model is evaluated on every rank's shard of
the validation set (confusion matrices summed), an instance model on rank 0 (COCOeval needs every detection).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from segprune import checkpoint
from segprune._utils import unwrap
from segprune.prune import channel_groups
from segprune.train import distributed
from segprune.train.aux import AuxLoss
from segprune.train.loop import SegmentationLoss, fit
from segprune.train.resume import Checkpoints
from segprune.workflows import rundir
from segprune.workflows.data import inferred_classes_note
from segprune.workflows.methods import method, regularizer
from segprune.workflows.recipe import Recipe, as_plain
from segprune.workflows.tasks import task_of


def run_training(recipe: Recipe, out: str | Path, device="cpu", *, resume: bool = False, force: bool = False,
                 quiet: bool = False) -> dict:
    """Train `recipe` into run folder `out` (one process, or one rank of a torchrun job; rank 0 writes).

    Writes ``recipe.yaml``, ``log.txt``, ``train.csv``, training checkpoints, the final model (``model/``) and
    ``metrics.json``; returns the metrics (rank 0; other ranks of an instance run get an empty dict).
    """
    task, plain, main_rank = task_of(recipe.task), as_plain(recipe), distributed.is_main()
    task.check(recipe, compress=False)
    out = rundir.claim(out, force=force, resume=resume, settings=plain)
    distributed.barrier()  # every rank has looked at the folder before rank 0 writes into it
    if main_rank:
        rundir.start(out, plain, resume=resume)
    rundir.seed_everything(recipe.seed, recipe.threads)  # every rank alike (see segprune.train.resume)
    world = distributed.get_world_size()
    if recipe.batch_size % world:
        raise ValueError(f"batch_size {recipe.batch_size} (the global batch) does not split over {world} processes")
    train_loader, val, num_classes = task.shard_loaders(recipe, world, distributed.get_rank())
    built, model_kwargs, weights_note = task.build_model(recipe, num_classes)
    config = task.config(recipe, model_kwargs, val, plain)
    example = torch.zeros(1, 3, *recipe.size)
    aux = AuxLoss(built, recipe.aux_layers, recipe.aux_weights, example_inputs=example) if recipe.aux_layers \
        else None  # before DDP wraps the model
    net = distributed.wrap(built, device, sync_bn=recipe.sync_bn)
    model = unwrap(net)
    reg = training_regularizer(recipe, task, model, device)

    def say(line: str, *, always: bool = False) -> None:
        if main_rank:
            rundir.RunLog(out / "log.txt", always or not quiet)(line)

    say(f"{'resuming' if resume else 'training'} {recipe.model} ({task.name}) on {recipe.data} for {recipe.epochs} "
        f"epochs ({world} process(es), device {device})")
    for note in (inferred_classes_note(train_loader), weights_note):
        if note:
            say(note)
    loss = task.loss(recipe, net, train_loader)
    if aux is not None:
        loss = SegmentationLoss(aux.criterion(task.pixel_loss(recipe, train_loader)))
    fit(net, train_loader, epochs=recipe.epochs, lr=recipe.lr, optimizer=recipe.optimizer, regularizer=reg,
        device=device, progress=not quiet and main_rank, accumulate=recipe.accumulate, amp=recipe.amp,
        amp_dtype=recipe.amp_dtype or None, resume=resume, log_dir=out, extra_loss=aux and aux.extra_loss,
        loss=loss, checkpoints=Checkpoints(out / "checkpoints", every=recipe.checkpoint_every, config=config),
        validate=_validation(task, val, recipe, num_classes, device),
        on_epoch=lambda epoch, value: say(f"epoch {epoch + 1}/{recipe.epochs}: loss {value:.4f}"))
    if hasattr(reg, "remove"):
        reg.remove()  # nothing of CAP stays in the model
    if aux is not None:
        aux.remove()  # nor of the auxiliary heads
    metrics = _evaluate(task, model, val, recipe, num_classes, device, main_rank)
    if main_rank:
        checkpoint.save(out / "model", model, config=config)
        # an instance run's file keeps COCOeval's own figures, as before the Task interface
        rundir.write_atomic(out / "metrics.json", json.dumps(metrics.get("coco", metrics), indent=2))
        say(f"{recipe.val_split} {task.summary(metrics)}; model in {out / 'model'}", always=True)  # even --quiet
    distributed.barrier()
    return metrics


def training_regularizer(recipe: Recipe, task, model, device="cpu"):
    """The method's sparsity on the prunable groups (traced through the task's prune inputs), or None."""
    task.check_sparsity(recipe)
    if method(recipe.method).sparsity is None:
        return None
    groups = channel_groups(model, task.prune_inputs(model, torch.zeros(1, 3, *recipe.size, device=device)))
    return regularizer(recipe.method, model, groups, lam=recipe.lam, warmup=recipe.warmup,
                       cap_affinity=recipe.cap_affinity, cap_weight=recipe.cap_weight,
                       cap_temperature=recipe.cap_temperature)


def _evaluate(task, model, val, recipe, num_classes, device, main_rank) -> dict:
    if not task.all_reduce_eval:  # rank 0 alone (instance: COCOeval needs every image's detections at once)
        return task.evaluate(model, val, recipe, num_classes=num_classes, device=device) if main_rank else {}
    return task.evaluate(model, val, recipe, num_classes=num_classes, device=device, all_reduce=True)


def _validation(task, val, recipe, num_classes, device):
    """Validation mIoU (the task's ``epoch_metric``) after every epoch (the curve in reports); every rank evaluates
    its shard. Instance models have none and are validated once, at the end (COCOeval over the whole set each epoch
    would cost more than the epoch)."""
    if task.epoch_metric is None:
        return None
    return lambda model: task.evaluate(model, val, recipe, num_classes=num_classes, device=device,
                                       all_reduce=True)[task.epoch_metric]
