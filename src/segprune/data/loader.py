"""Seeded data loaders, single-process or distributed; batches of images of several sizes.

Training stacks a batch into one tensor, so its images must share a size (the recipe's ``size`` crops them to
it): :func:`collate_same_size` says so, naming the sizes, instead of torch.stack's bare error. Evaluation runs on
images at their own size, which may differ (a folder of phone photos): :func:`collate_by_size` groups them, and
:func:`size_tolerant` gives an existing loader that collate.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate, get_worker_info


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    distributed: bool = False,
    drop_last: bool = False,
    pin_memory: bool = False,
    num_replicas: int | None = None,
    rank: int | None = None,
    collate_fn=None,
) -> DataLoader:
    """A DataLoader whose order and augmentations are fixed by ``seed``.

    The loader's generator, seeded with ``seed``, fixes the shuffle order and the base seed of the workers; each
    worker reseeds the dataset's transform with its own seed (see :mod:`segprune.data.transforms`).

    Args:
        dataset: The dataset.
        batch_size: Samples per batch (per process when distributed).
        shuffle: Shuffle every epoch.
        seed: Seed of the order and of the workers' augmentations.
        num_workers: Worker processes; 0 loads in the calling process.
        distributed: Give each process its own shard through a ``DistributedSampler`` seeded with ``seed``;
            call ``loader.sampler.set_epoch(epoch)`` at the start of each epoch so that shuffles differ.
        drop_last: Drop the last incomplete batch (useful in training with batch norm).
        pin_memory: Pin batches in page-locked memory for faster copies to the GPU.
        num_replicas: Number of processes when distributed; by default the world size of the process group.
        rank: This process's rank when distributed; by default its rank in the process group.
        collate_fn: How samples become a batch; None stacks them, with a clear error when their sizes differ
            (:func:`collate_same_size`); instance targets use :func:`segprune.data.instances.instance_collate`.
    """
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if distributed:
        sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        generator=generator,
        worker_init_fn=reseed_worker if num_workers else None,
        drop_last=drop_last,
        pin_memory=pin_memory,
        collate_fn=collate_fn or collate_same_size,
    )


class SizeGroups(list):
    """A batch whose images differ in size: a list of ``(images, targets)`` batches, one per size, each stacked."""


def _sizes(samples) -> list[tuple[int, ...]] | None:
    """The (H, W) of each sample's image, or None when samples are not (image tensor, ...) pairs."""
    if not all(isinstance(s, tuple | list) and s and torch.is_tensor(s[0]) for s in samples):
        return None
    return [tuple(s[0].shape[-2:]) for s in samples]


def collate_same_size(samples):
    """``default_collate``, but a batch of images of different sizes raises an error naming the sizes and the fix.

    Raises:
        ValueError: The images of the batch differ in size.
    """
    sizes = _sizes(samples)
    if sizes is not None and len(set(sizes)) > 1:
        listed = ", ".join(f"{h}x{w} ({n})" for (h, w), n in Counter(sizes).most_common())
        raise ValueError(f"a batch holds images of {len(set(sizes))} sizes (H x W: {listed}), which cannot be stacked: "
                         "set the recipe's `size` (the training crop, e.g. --set size=[360,480]) for training and "
                         "`eval_size` (e.g. --set eval_size=[360,480], or `segprune eval --eval-size H W`) for "
                         "validation, or use batch_size 1; `segprune check` counts the image sizes of each split")
    return default_collate(samples)


def collate_by_size(samples):
    """Samples of one size stacked exactly as ``default_collate`` does; samples of several sizes as
    :class:`SizeGroups`, one stacked batch per size in order of first appearance, so evaluation can run each."""
    sizes = _sizes(samples)
    if sizes is None or len(set(sizes)) == 1:
        return default_collate(samples)
    groups: dict[tuple[int, ...], list] = {}
    for sample, size in zip(samples, sizes):
        groups.setdefault(size, []).append(sample)
    return SizeGroups(default_collate(group) for group in groups.values())


def size_groups(batch) -> list:
    """The ``(images, targets)`` batches of a batch from :func:`collate_by_size` (one, unless sizes differed)."""
    return list(batch) if isinstance(batch, SizeGroups) else [batch]


def size_tolerant(loader):
    """``loader``, rebuilt with :func:`collate_by_size` when it is a DataLoader that stacks with the default collate
    (which fails on images of different sizes); any other iterable is returned as is.

    The dataset, sampler or batch sampler, workers and generator are kept, so the batches hold the same samples in
    the same order and, when sizes agree, the same tensors.
    """
    if not isinstance(loader, DataLoader) or loader.collate_fn not in (default_collate, collate_same_size):
        return loader
    if loader.batch_size is None and loader.batch_sampler is None:  # no batching: nothing is stacked
        return loader
    batching = (dict(batch_size=loader.batch_size, sampler=loader.sampler, drop_last=loader.drop_last)
                if loader.batch_size is not None else dict(batch_sampler=loader.batch_sampler))
    return DataLoader(loader.dataset, **batching, num_workers=loader.num_workers, collate_fn=collate_by_size,
                      pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                      timeout=loader.timeout, multiprocessing_context=loader.multiprocessing_context,
                      persistent_workers=loader.persistent_workers)


def reseed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: reseed the worker's copy of the dataset's transform with the worker's seed.

    Looks through ``Subset``- and ``ConcatDataset``-style wrappers (``.dataset``, ``.datasets``) for a
    ``transform`` with a ``reseed`` method, such as :class:`~segprune.data.transforms.Compose`.
    """
    info = get_worker_info()
    pending = [info.dataset]
    while pending:
        dataset = pending.pop()
        transform = getattr(dataset, "transform", None)
        if hasattr(transform, "reseed"):
            transform.reseed(info.seed % 2**63)
        pending.extend(getattr(dataset, "datasets", []))
        if hasattr(dataset, "dataset"):
            pending.append(dataset.dataset)
