"""Data assembly: the datasets and loaders of a recipe, or of a ``--data KIND[:PATH]`` string, built in one place.

Semantic data is ``synthetic`` (procedural scenes, made from the recipe's size, class count and seed) or a dataset
name of :data:`segprune.data.DATASETS` with a root folder; instance data is ``synthetic`` or ``coco`` with
``IMAGES_DIR:ANNOTATIONS_JSON``. Datasets that have no split (image/mask folders) ignore the split asked for.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from segprune.data import DATASETS, build_dataset, eval_transforms, train_transforms
from segprune.data.check import SplitCheck, check_splits
from segprune.data.instances import DATA_LOSS, CocoInstances, check_instances
from segprune.data.synthetic import SyntheticInstances, SyntheticScenes
from segprune.workflows.recipe import Recipe


def data_spec(spec: str) -> tuple[str, str]:
    """``KIND:PATH`` (or just ``KIND``, e.g. ``synthetic``) as (kind, root)."""
    kind, _, root = spec.partition(":")
    return kind.strip(), root.strip()


def with_data(overrides: dict, spec: str | None) -> dict:
    """Recipe overrides with ``--data KIND[:PATH]`` folded in as ``data`` and ``data_root``."""
    if not spec:
        return overrides
    kind, root = data_spec(spec)
    return {**overrides, "data": kind, **({"data_root": root} if root else {})}


def has_splits(kind: str) -> bool:
    """Whether dataset ``kind`` comes in named splits (folders of image/mask pairs do not)."""
    return "split" in inspect.signature(_constructor(kind)).parameters


def open_dataset(kind: str, root: str, *, split: str | None = None, **kwargs) -> Dataset:
    """Dataset ``kind`` at ``root``: ``split`` where it has splits; keyword arguments it does not take are dropped
    (e.g. ``check_sizes`` for a dataset that does not check sizes)."""
    params = inspect.signature(_constructor(kind)).parameters
    kept = {k: v for k, v in kwargs.items() if k in params}
    if split is not None and "split" in params:
        kept["split"] = split
    return build_dataset(kind, root=root, **kept)


def _constructor(kind: str):
    if kind not in DATASETS:
        raise ValueError(f"unknown dataset {kind!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[kind]


def first(dataset: Dataset, n: int) -> Dataset:
    """The first ``n`` samples (all when ``n`` is 0)."""
    return Subset(dataset, range(min(n, len(dataset)))) if n > 0 else dataset


def base_dataset(dataset: Dataset) -> Dataset:
    """The dataset under a ``Subset``."""
    return dataset.dataset if isinstance(dataset, Subset) else dataset


def class_names(data) -> list[str]:
    """The class names of a dataset, a ``Subset`` of one or a loader over either (empty when it has none)."""
    return list(getattr(base_dataset(getattr(data, "dataset", data)), "class_names", ()) or ())


def semantic_datasets(r) -> tuple[Dataset, Dataset, int]:
    """(train, validation, number of classes) of a semantic recipe."""
    if r.data == "synthetic":
        kw = dict(size=r.size, num_classes=r.num_classes, seed=r.seed)
        return (SyntheticScenes(num_samples=r.train_samples, split="train", **kw),
                SyntheticScenes(num_samples=r.val_samples, split="val", **kw), r.num_classes)
    # a dataset that infers its classes (a folder) takes the recipe's count instead, when the recipe gives one
    classes = {"num_classes": r.num_classes} if "num_classes" in r.given else {}
    train = open_dataset(r.data, r.data_root, split="train", transform=train_transforms(crop=r.size, seed=r.seed),
                         **classes)
    val = open_dataset(r.data, r.data_root, split=r.val_split,
                       transform=eval_transforms(size=r.eval_size if all(r.eval_size) else None), **classes)
    return first(train, r.train_samples), first(val, r.val_samples), train.num_classes


def inferred_classes_note(data) -> str | None:
    """The line a run logs when its class count was inferred from the data (a folder's largest mask label), so
    the user sees what the model is built with and how to choose it; None when the count was known."""
    dataset = base_dataset(getattr(data, "dataset", data))
    if not getattr(dataset, "inferred_classes", False):
        return None
    return (f"{dataset.num_classes} classes, inferred from the largest mask label in {dataset.root} "
            "(set num_classes in the recipe to choose)")


def semantic_loaders(r) -> tuple[DataLoader, DataLoader, int]:
    """(train loader, validation loader, number of classes): shuffled with a generator seeded by the recipe."""
    train, val, classes = semantic_datasets(r)
    g = torch.Generator().manual_seed(r.seed)
    return (DataLoader(train, batch_size=r.batch_size, shuffle=True, generator=g, drop_last=True),
            DataLoader(val, batch_size=r.batch_size), classes)


def instance_datasets(r) -> tuple[Dataset, Dataset, int]:
    """(train, validation, number of object classes) of an instance recipe (see :mod:`segprune.workflows.tasks`).

    ``val_split`` of COCO data is ``IMAGES_DIR:ANNOTATIONS_JSON`` of a validation set; anything else validates on
    the training files (without flips), for sets without a split such as the fruits set.
    """
    if r.data == "synthetic":
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
    train = CocoInstances(*coco_paths(r.data_root), size=r.size, train=True, seed=r.seed)
    val = CocoInstances(*(coco_paths(r.val_split) if ":" in r.val_split else coco_paths(r.data_root)), size=r.size)
    if [c["id"] for c in val.categories] != [c["id"] for c in train.categories]:
        raise ValueError(f"the validation categories {val.categories} differ from the training ones")
    return first(train, r.train_samples), first(val, r.val_samples), train.num_classes


def coco_paths(spec: str) -> tuple[str, str]:
    """``IMAGES_DIR:ANNOTATIONS_JSON`` as a pair."""
    images, sep, annotations = spec.rpartition(":")
    if not sep or not images or not annotations:
        raise ValueError(f"COCO instance data is IMAGES_DIR:ANNOTATIONS_JSON, got {spec!r}")
    return images, annotations


def evaluation_dataset(spec: str, config: dict, *, split: str, samples: int = 0,
                       eval_size: tuple[int, int] | None = None) -> Dataset:
    """The semantic dataset ``segprune eval`` measures a checkpoint on: ``synthetic`` scenes like those its recipe
    trained on (from the checkpoint's config), or ``KIND:PATH`` resized to ``eval_size`` when given."""
    kind, root = data_spec(spec)
    if kind == "synthetic":
        r = {**dataclasses.asdict(Recipe()), **config.get("recipe", {})}  # checkpoints saved without a recipe
        return SyntheticScenes(num_samples=samples or r["val_samples"], size=tuple(r["size"]), seed=r["seed"],
                               num_classes=config.get("model_kwargs", {}).get("num_classes", r["num_classes"]),
                               split=split)
    classes = config.get("model_kwargs", {}).get("num_classes")  # a folder is read with the model's classes
    return open_dataset(kind, root, split=split, transform=eval_transforms(size=eval_size),
                        **({"num_classes": classes} if classes else {}))


def instance_dataset(spec: str, *, size=(550, 550), train: bool = False, seed: int = 0, split: str = "train",
                     num_samples: int = 64, num_classes: int = 4) -> Dataset:
    """An instance dataset from a ``--data`` spec: ``coco:IMAGES_DIR:ANNOTATIONS_JSON`` or ``synthetic``.

    Args:
        spec: The spec; the annotation file is what follows the last colon.
        size: Input size (H, W) of the samples; None keeps COCO images at their size (synthetic: 96 x 128).
        train: Training samples (flips).
        seed: Seed of the flips and, for synthetic data, of the scenes.
        split: Synthetic data: the split.
        num_samples: Synthetic data: the number of samples.
        num_classes: Synthetic data: the number of object classes.
    """
    kind, _, rest = spec.partition(":")
    if kind == "synthetic":
        return SyntheticInstances(num_samples=num_samples, size=size or (96, 128), num_classes=num_classes,
                                  seed=seed, split=split, train=train)
    images, sep, annotations = rest.rpartition(":")
    if kind != "coco" or not sep or not images or not annotations:
        raise ValueError(f"instance data is coco:IMAGES_DIR:ANNOTATIONS_JSON or synthetic, got {spec!r}")
    return CocoInstances(images, annotations, size=size, train=train, seed=seed)


def check_data(spec: str, splits: Sequence[str] = ("train", "val", "test")) -> tuple[str, list[SplitCheck]]:
    """`segprune check`: read every sample of the semantic dataset ``spec`` (``KIND:PATH``) in ``splits`` (all of
    it where it has no splits); returns (kind, one check per split, naming every bad file)."""
    kind, root = data_spec(spec)
    # check_sizes off: each file is read once, in the check itself, so every bad one is reported
    checks = check_splits(lambda split: open_dataset(kind, root, split=split, check_sizes=False),
                          list(splits) if has_splits(kind) else ["all"])
    return kind, checks


def check_instance_data(spec: str) -> dict:
    """`segprune check --task instance`: the annotation file's findings, then every image read.

    Returns:
        ``images`` (how many), ``notes`` (the annotation findings: a summary, then one line each), ``unreadable``
        (a line per image that cannot be read) and ``lost`` (annotation problems that lose data).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the summary warning repeats what the findings say
        dataset = instance_dataset(spec, size=None)
    problems = getattr(dataset, "problems", None)
    return {"images": len(dataset), "notes": [] if problems is None else [problems.summary(), *problems.lines()],
            "unreadable": check_instances(dataset),
            "lost": 0 if problems is None else sum(problems.count(kind) for kind in DATA_LOSS)}
