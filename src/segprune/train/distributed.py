"""Data-parallel training with ``torchrun``: one process per device, gradients averaged by DDP.

``torchrun --nproc_per_node=N -m segprune.cli train ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
:func:`setup` reads them and joins the process group (NCCL on CUDA, gloo on CPU). Without them everything here
is a no-op for a single process, so the same code runs both ways. Rank 0 alone writes logs and checkpoints;
metrics are summed over ranks (the confusion matrix is all-reduced, see
:meth:`segprune.eval.metrics.ConfusionMatrix.all_reduce`).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the process that writes files (rank 0, or the only process)."""
    return get_rank() == 0


def setup(device: str = "cpu") -> torch.device:
    """Join the process group when launched by ``torchrun`` and return this process's device.

    Args:
        device: ``"cpu"`` or ``"cuda"``; under ``torchrun`` a CUDA process takes GPU ``LOCAL_RANK``.

    Returns:
        The device to train on. Outside ``torchrun`` (no ``WORLD_SIZE`` in the environment) no group is made.
    """
    cuda = torch.device(device).type == "cuda"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        if not dist.is_available():
            raise RuntimeError("torch.distributed is not available in this build of PyTorch")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda and is_distributed():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def cleanup() -> None:
    """Leave the process group, if in one. Every rank meets at a barrier first: a rank tearing gloo down while
    another still has a collective in flight aborts the process ("terminate called without an active
    exception"), which made the torchrun test flaky."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def wrap(model: nn.Module, device: torch.device, *, sync_bn: bool = False) -> nn.Module:
    """``model`` on ``device``, in DistributedDataParallel inside a process group (else unchanged).

    Args:
        model: The model; its parameters are broadcast from rank 0 when wrapped.
        device: This process's device.
        sync_bn: Convert BatchNorms to SyncBatchNorm, so batch statistics span the global batch (CUDA only).
    """
    model = model.to(device)
    if not is_distributed():
        return model
    if sync_bn:
        if device.type != "cuda":
            raise ValueError("SyncBatchNorm needs CUDA; on CPU train without sync_bn (or use GroupNorm)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def mean_across(value: float) -> float:
    """The mean of ``value`` over all ranks (``value`` itself outside a process group)."""
    if not is_distributed():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.item() / get_world_size()


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order: every sample on exactly one rank, none repeated.

    Unlike ``DistributedSampler`` it pads nothing, so metrics summed over ranks equal a single process's.
    """

    def __init__(self, length: int, *, num_replicas: int | None = None, rank: int | None = None):
        self.length = length
        self.num_replicas = get_world_size() if num_replicas is None else num_replicas
        self.rank = get_rank() if rank is None else rank

    def __iter__(self):
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))
