"""Seeded data loaders, single-process or distributed."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info


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
        collate_fn: How samples become a batch; None stacks them (instance targets use
            :func:`segprune.data.instances.instance_collate`).
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
        collate_fn=collate_fn,
    )


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
