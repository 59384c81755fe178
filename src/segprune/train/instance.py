"""Instance segmentation (YOLACT) on the shared training loop, and its COCO evaluation.

The loop of :mod:`segprune.train.loop` stays the one loop: checkpoints, exact resume, AMP, gradient accumulation,
DDP and the sparsity regulariser all apply. What changes is the loss, given to :func:`~segprune.train.loop.fit`
as ``loss_fn(output, targets)``: YOLACT's loss at the anchors of the batch's input size, with targets a list of
dicts (:mod:`segprune.data.instances`). The loss runs in float32 outside autocast: its sums over anchors and
pixels want full precision (and a plain BCE on probabilities refuses to run under autocast), and it is small
next to the network.

A recipe (:class:`segprune.pipeline.Recipe`) drives a run as for semantic models; its fields read as:

- ``data``: ``synthetic`` (the procedural scenes' objects; ``num_classes - 2`` object classes, since the scenes'
  ground and sky have no instances) or ``coco`` with ``data_root`` ``IMAGES_DIR:ANNOTATIONS_JSON``;
- ``val_split``: for COCO, ``IMAGES_DIR:ANNOTATIONS_JSON`` of a validation set; anything else validates on the
  training files (without flips), for sets that come without a split such as the fruits set;
- ``size``: the network input (H, W); ``train_samples`` / ``val_samples``: how many (COCO: the first N, 0 = all);
- ``method``: ``slimming`` trains with the L1 penalty on the BN scales of the prunable groups (traced through
  ``model.prune_inputs``); ``cap`` is refused (its context affinity is defined on semantic logits); other
  methods train without a regulariser.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from segprune._utils import unwrap
from segprune.data.instances import CocoInstances, make_instance_loader
from segprune.eval.coco_metrics import CocoEvaluator


class InstanceLoss:
    """``loss_fn(output, targets)`` for :func:`~segprune.train.loop.fit`: a YOLACT loss at the input's anchors.

    Args:
        model: The model (or DDP around it); it gives ``anchors(h, w)``.
        loss: ``loss(outputs, targets, anchors) -> (total, parts)``, e.g. ``YolactLoss(num_classes)``.

    The parts of the last batch (box, conf, mask, seg) are kept in ``self.parts`` for logging.
    """

    def __init__(self, model: nn.Module, loss: nn.Module):
        self.model, self.loss, self.parts = model, loss, {}

    def __call__(self, output: dict, targets: list[dict]) -> torch.Tensor:
        height, width = targets[0]["masks"].shape[-2:]
        device = output["cls"].device
        anchors = unwrap(self.model).anchors(int(height), int(width)).to(device)
        # only the tensors: the loss need not know image ids and original sizes (and may move every value)
        tensors = [{k: v for k, v in t.items() if isinstance(v, torch.Tensor)} for t in targets]
        with torch.autocast(device.type, enabled=False):
            total, self.parts = self.loss({k: v.float() for k, v in output.items()}, tensors, anchors)
        return total


@torch.inference_mode()
def iterate_predictions(model: nn.Module, loader, *, device="cpu", original_size: bool = False,
                        **postprocess_kwargs):
    """Yield ``(image_id, prediction)`` for every image of ``loader``, predictions on the CPU.

    Args:
        model: An instance model (YOLACT): ``anchors(h, w)`` and outputs for ``postprocess``.
        loader: Batches of (images, list of targets).
        device: Where the model runs.
        original_size: Boxes and masks in each image's original frame (``target["orig_size"]``): the soft masks
            are upsampled there before thresholding, as YOLACT's own evaluation does. Otherwise in the input's.
        postprocess_kwargs: For :func:`segprune.models.yolact.postprocess` (score threshold, NMS IoU, top k).

    The model runs in eval mode; its train/eval mode is restored afterwards.
    """
    from segprune.models.yolact import postprocess

    was_training, model = model.training, unwrap(model)
    model.eval()
    try:
        for images, targets in loader:
            size = tuple(images.shape[-2:])
            outputs, anchors = model(images.to(device)), model.anchors(*size)
            for i, target in enumerate(targets):
                frame = tuple(target["orig_size"]) if original_size else size
                one = {k: v[i : i + 1] for k, v in outputs.items()}
                found = postprocess(one, anchors, frame, **postprocess_kwargs)[0]
                yield target["image_id"], {k: v.cpu() for k, v in found.items()}
    finally:
        model.train(was_training)


def predict_instances(model: nn.Module, loader, *, device="cpu", **kwargs) -> dict[int, dict]:
    """Postprocessed predictions of every image in ``loader``, keyed by image id (see :func:`iterate_predictions`;
    dense masks of a large set do not fit in memory: :func:`evaluate_model` encodes them as it goes)."""
    return dict(iterate_predictions(model, loader, device=device, **kwargs))


def evaluate_model(model: nn.Module, dataset: Dataset, *, batch_size: int = 4, device="cpu",
                   **postprocess_kwargs) -> dict[str, dict[str, float]]:
    """COCO box and mask AP of ``model`` on ``dataset`` (an instance dataset, or a ``Subset`` of one).

    Predictions are made in each image's original frame (see :func:`iterate_predictions`) and RLE-encoded image
    by image, so memory holds no more than one image's dense masks.
    """
    loader = make_instance_loader(dataset, batch_size=batch_size, shuffle=False, seed=0)
    evaluator = CocoEvaluator(dataset.dataset if isinstance(dataset, Subset) else dataset)
    found = iterate_predictions(model, loader, device=device, original_size=True, **postprocess_kwargs)
    for image_id, prediction in found:
        evaluator.add(image_id, prediction)
    return evaluator.compute()


# Recipes


def _first(dataset: Dataset, n: int) -> Dataset:
    return Subset(dataset, range(min(n, len(dataset)))) if n > 0 else dataset


def instance_datasets(r) -> tuple[Dataset, Dataset, int]:
    """(train, validation, number of object classes) of a recipe (see the module docstring)."""
    if r.data == "synthetic":
        from segprune.data.synthetic import SyntheticInstances

        if r.num_classes < 3:
            raise ValueError(f"num_classes {r.num_classes}: the instance scenes need at least 3 (ground, sky, one "
                             "object class)")
        # small sets stay in memory (about 7 bytes a pixel), so epochs after the first skip drawing the scenes
        cache = (r.train_samples + r.val_samples) * r.size[0] * r.size[1] * 7 <= 2**30
        kw = dict(size=r.size, num_classes=r.num_classes - 2, seed=r.seed, cache=cache)
        train = SyntheticInstances(num_samples=r.train_samples, split="train", train=True, **kw)
        return train, SyntheticInstances(num_samples=r.val_samples, split="val", **kw), train.num_classes
    if r.data != "coco":
        raise ValueError(f"instance data is 'synthetic' or 'coco' (data_root IMAGES_DIR:ANNOTATIONS_JSON), got "
                         f"{r.data!r}")
    train = CocoInstances(*_coco_paths(r.data_root), size=r.size, train=True, seed=r.seed)
    val_paths = _coco_paths(r.val_split) if ":" in r.val_split else _coco_paths(r.data_root)
    val = CocoInstances(*val_paths, size=r.size)
    if [c["id"] for c in val.categories] != [c["id"] for c in train.categories]:
        raise ValueError(f"the validation categories {val.categories} differ from the training ones")
    return _first(train, r.train_samples), _first(val, r.val_samples), train.num_classes


def _coco_paths(spec: str) -> tuple[str, str]:
    images, sep, annotations = spec.rpartition(":")
    if not sep or not images or not annotations:
        raise ValueError(f"COCO instance data is IMAGES_DIR:ANNOTATIONS_JSON, got {spec!r}")
    return images, annotations


def _groups(model: nn.Module, size, device):
    """The channel groups of ``model``, traced through ``prune_inputs`` (prototypes coupled to coefficients)."""
    from segprune.prune import channel_groups

    x = torch.zeros(1, 3, *size, device=device)
    return channel_groups(model, model.prune_inputs(x) if hasattr(model, "prune_inputs") else x)


def _regularizer(r, model: nn.Module, device, groups=None):
    """The BN-scale L1 penalty of ``slimming`` on the prunable groups, or None."""
    if r.method == "cap":
        raise ValueError("method cap is defined on semantic logits; train YOLACT with slimming (or none)")
    if r.method != "slimming":
        return None
    from segprune.prune.regularizer import BNSparsity

    groups = groups if groups is not None else _groups(model, r.size, device)
    return BNSparsity(model, lam=r.lam, groups=groups, warmup=r.warmup)


def _clear_run(out: Path) -> None:
    """Remove what an earlier run wrote in ``out`` (--force), as ``segprune train`` does."""
    import shutil

    from segprune.train.run import _RUN_FILES

    for path in (out / name for name in _RUN_FILES):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _seed_everything(seed: int, threads: int) -> None:
    """Every rank alike (see :mod:`segprune.train.resume`)."""
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    torch.set_num_threads(threads)


def run_instance_training(recipe, out: Path, device, *, resume: bool, force: bool, quiet: bool) -> dict:
    """Train ``recipe``'s instance model into run folder ``out`` (one process or one rank; rank 0 writes).

    Writes, like ``segprune train``: ``recipe.yaml``, ``log.txt``, ``train.csv``, training checkpoints, the final
    model (``model/``, config with ``"task": "instance"`` and the categories) and ``metrics.json`` (box and mask
    AP on the validation set). Returns the metrics.
    """
    import yaml

    from segprune import checkpoint
    from segprune.models import create_model
    from segprune.models.yolact import YolactLoss
    from segprune.pipeline import RunLog, as_plain
    from segprune.train import distributed
    from segprune.train.loop import fit
    from segprune.train.resume import Checkpoints
    from segprune.train.run import _check_run_dir

    plain, main_rank = {**as_plain(recipe), "task": "instance"}, distributed.is_main()
    _check_run_dir(out, plain, force=force, resume=resume)
    distributed.barrier()
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            _clear_run(out)
            (out / "recipe.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))
    _seed_everything(recipe.seed, recipe.threads)
    train, val, num_classes = instance_datasets(recipe)
    world = distributed.get_world_size()
    if recipe.batch_size % world:
        raise ValueError(f"batch_size {recipe.batch_size} (the global batch) does not split over {world} processes")
    loader = make_instance_loader(train, batch_size=recipe.batch_size // world, shuffle=True, seed=recipe.seed,
                                  drop_last=True, num_workers=recipe.num_workers, distributed=True,
                                  num_replicas=world, rank=distributed.get_rank())
    model_kwargs = {"num_classes": num_classes, "width": recipe.width}
    categories = (val.dataset if isinstance(val, Subset) else val).categories
    config = {"model": recipe.model, "model_kwargs": model_kwargs, "recipe": plain, "task": "instance",
              "categories": categories}
    net = distributed.wrap(create_model(recipe.model, **model_kwargs), device, sync_bn=recipe.sync_bn)
    model = unwrap(net)
    if getattr(model, "task", None) != "instance":
        raise ValueError(f"{recipe.model} is not an instance segmentation model (try test_yolact, yolact_resnet50)")
    reg = _regularizer(recipe, model, device)

    def say(line: str) -> None:
        if main_rank:
            RunLog(out / "log.txt", not quiet)(line)

    say(f"{'resuming' if resume else 'training'} {recipe.model} (instance) on {recipe.data} for {recipe.epochs} "
        f"epochs ({world} process(es), device {device})")
    fit(net, loader, epochs=recipe.epochs, lr=recipe.lr, optimizer=recipe.optimizer, regularizer=reg,
        device=device, progress=not quiet and main_rank, accumulate=recipe.accumulate, amp=recipe.amp,
        amp_dtype=recipe.amp_dtype or None, resume=resume, log_dir=out,
        loss_fn=InstanceLoss(net, YolactLoss(num_classes)),
        checkpoints=Checkpoints(out / "checkpoints", every=recipe.checkpoint_every, config=config),
        on_epoch=lambda epoch, loss: say(f"epoch {epoch + 1}/{recipe.epochs}: loss {loss:.4f}"))
    metrics = {}
    if main_rank:  # the whole validation set on rank 0: COCOeval needs every image's detections at once
        metrics = evaluate_model(model, val, batch_size=recipe.batch_size, device=device)
        checkpoint.save(out / "model", model, config=config)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        say(f"box AP {metrics['bbox']['AP']:.4f}, mask AP {metrics['segm']['AP']:.4f}; model in {out / 'model'}")
    distributed.barrier()
    return metrics


def instance_recipe(config: dict, path: str | Path | None, overrides: dict):
    """The recipe of a step after training (fine-tuning): the checkpoint's own, or the file at ``path``, with
    ``overrides``."""
    from segprune.pipeline import recipe_from

    base = {k: v for k, v in config.get("recipe", {}).items() if k != "task"} if path is None else {}
    return recipe_from(path, {**base, **overrides})


def finetune_instances(model: nn.Module, recipe, *, progress: bool = True) -> list[float]:
    """Fine-tune an instance model ``finetune_epochs`` at ``finetune_lr`` on the recipe's training data."""
    from segprune.models.yolact import YolactLoss
    from segprune.train.loop import fit

    train, _, num_classes = instance_datasets(recipe)
    if num_classes != model.num_classes:
        raise ValueError(f"the model predicts {model.num_classes} classes, the {recipe.data} data has {num_classes}")
    loader = make_instance_loader(train, batch_size=recipe.batch_size, shuffle=True, seed=recipe.seed,
                                  drop_last=True, num_workers=recipe.num_workers)
    return fit(model, loader, epochs=recipe.finetune_epochs, lr=recipe.finetune_lr, optimizer=recipe.optimizer,
               device=recipe.device, progress=progress, desc="fine-tune",
               loss_fn=InstanceLoss(model, YolactLoss(num_classes)))
