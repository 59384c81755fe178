"""`segprune train` as a library function: a run folder with the resolved recipe, a log, a CSV, training
checkpoints for exact resume, the final model and its metrics; one process or one rank under torchrun."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from segprune._utils import unwrap
from segprune.pipeline import RunLog, as_plain

_RESUME_MAY_CHANGE = ("threads", "num_workers", "device")  # how the run computes, not what
_RUN_FILES = ("checkpoints", "model", "tensorboard", "train.csv", "metrics.json", "log.txt")  # what train writes


def _check_run_dir(out: Path, plain: dict, *, force: bool, resume: bool) -> None:
    """Refuse a run folder already in use unless resuming it (with the same settings) or forced to start over."""
    import yaml

    if resume:
        saved = out / "recipe.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"{out}: no run to resume (recipe.yaml not found)")
        old = yaml.safe_load(saved.read_text()) or {}
        changed = sorted(k for k in plain if old.get(k) != plain[k] and k not in _RESUME_MAY_CHANGE)
        if changed:
            raise ValueError(f"--resume needs the settings of the run in {out}; these differ: {', '.join(changed)}")
    elif out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or --force to start over")


def _train_loaders(r):
    """Train loader (a DistributedSampler shard of a global batch of r.batch_size) and validation shard."""
    from torch.utils.data import DataLoader

    from segprune.data import make_loader
    from segprune.pipeline import loaders
    from segprune.train.distributed import ShardSampler, get_rank, get_world_size

    train, val, num_classes = loaders(r)
    world = get_world_size()
    if r.batch_size % world:
        raise ValueError(f"batch_size {r.batch_size} (the global batch) does not split over {world} processes")
    # The same sampler for 1 or N processes, so both see the same global batches.
    train = make_loader(train.dataset, batch_size=r.batch_size // world, shuffle=True, seed=r.seed, drop_last=True,
                        num_workers=r.num_workers, distributed=True, num_replicas=world, rank=get_rank())
    val = DataLoader(val.dataset, batch_size=r.batch_size, sampler=ShardSampler(len(val.dataset)),
                     num_workers=r.num_workers)
    return train, val, num_classes


def _aux_heads(recipe, model):
    """The recipe's auxiliary heads (`aux_layers`, `aux_weights`) attached to `model`, or None."""
    if not recipe.aux_layers:
        return None
    import torch

    from segprune.train.aux import AuxLoss

    return AuxLoss(model, recipe.aux_layers, recipe.aux_weights, example_inputs=torch.zeros(1, 3, *recipe.size))


def run_training(recipe, out: Path, device, *, resume: bool, force: bool, quiet: bool) -> None:
    """Train `recipe` into run folder `out` (one process, or one rank of a torchrun job; rank 0 writes)."""
    import random

    import numpy as np
    import torch
    import yaml

    from segprune import checkpoint
    from segprune.eval.metrics import evaluate
    from segprune.models import create_model
    from segprune.pipeline import loss_fn, sparsity
    from segprune.prune import channel_groups
    from segprune.train import distributed
    from segprune.train.loop import fit
    from segprune.train.resume import Checkpoints

    plain, main_rank = as_plain(recipe), distributed.is_main()
    _check_run_dir(out, plain, force=force, resume=resume)
    distributed.barrier()  # every rank has looked at the folder before rank 0 writes into it
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:  # --force: nothing of an earlier run may mix with this one
            for path in (out / name for name in _RUN_FILES):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            (out / "recipe.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))
    torch.manual_seed(recipe.seed)  # every rank alike (see segprune.train.resume)
    np.random.seed(recipe.seed)
    random.seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    train_loader, val_loader, num_classes = _train_loaders(recipe)
    model_kwargs = {"num_classes": num_classes, "width": recipe.width}
    config = {"model": recipe.model, "model_kwargs": model_kwargs, "recipe": plain}
    aux = _aux_heads(recipe, built := create_model(recipe.model, **model_kwargs))  # before DDP wraps the model
    net = distributed.wrap(built, device, sync_bn=recipe.sync_bn)
    model = unwrap(net)
    groups = None
    if recipe.method in ("slimming", "cap"):  # the method's sparsity trains along
        groups = channel_groups(model, torch.zeros(1, 3, *recipe.size, device=device))
    reg = sparsity(recipe, model, groups) if groups is not None else None

    def say(line: str) -> None:
        if main_rank:
            RunLog(out / "log.txt", not quiet)(line)

    say(f"{'resuming' if resume else 'training'} {recipe.model} on {recipe.data} for {recipe.epochs} epochs "
        f"({distributed.get_world_size()} process(es), device {device})")
    fit(net, train_loader, epochs=recipe.epochs, lr=recipe.lr, optimizer=recipe.optimizer, regularizer=reg,
        device=device, progress=not quiet and main_rank, accumulate=recipe.accumulate, amp=recipe.amp,
        amp_dtype=recipe.amp_dtype or None, resume=resume, log_dir=out, extra_loss=aux and aux.extra_loss,
        criterion=aux.criterion(loss_fn(recipe, train_loader)) if aux else loss_fn(recipe, train_loader),
        checkpoints=Checkpoints(out / "checkpoints", every=recipe.checkpoint_every, config=config),
        on_epoch=lambda epoch, loss: say(f"epoch {epoch + 1}/{recipe.epochs}: loss {loss:.4f}"))
    if hasattr(reg, "remove"):
        reg.remove()  # nothing of CAP stays in the model
    if aux is not None:
        aux.remove()  # nor of the auxiliary heads
    metrics = evaluate(model, val_loader, num_classes=num_classes, device=device, all_reduce=True)
    if main_rank:
        checkpoint.save(out / "model", model, config=config)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        say(f"{recipe.val_split} mIoU {metrics['miou']:.4f}; model in {out / 'model'}")
