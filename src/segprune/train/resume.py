"""Training-state checkpoints: written every N optimizer steps and at epoch ends, resumed exactly.

A checkpoint folder ``step-0000012`` is a model checkpoint (:mod:`segprune.checkpoint`: weights.safetensors,
plan.json, config.json, so ``checkpoint.load`` and ``segprune eval`` read it) plus the training state in two
files, without pickle: ``state.safetensors`` holds every tensor (optimizer moments, RNG states) and
``state.json`` the rest, each tensor replaced by ``{"__tensor__": key}``. A folder is written under a temporary
name and renamed into place; then the text file ``latest`` (also written by rename) names it, and folders
beyond the newest ``keep`` are deleted. A kill at any moment leaves ``latest`` naming a complete checkpoint.

Resuming restores the weights; the optimizer, LR scheduler, GradScaler and regulariser states; epoch, batches
done in the epoch and optimizer steps; the RNG states of torch (CPU and CUDA), numpy and ``random`` as they
were when the checkpoint was written; the seeded generators of the dataset's transforms; and the loader
generator's state at the start of the epoch, from which the interrupted epoch's order is drawn again, its
finished batches skipped without being loaded. So with ``num_workers=0`` a resumed run computes what the
uninterrupted one would have. Limits: the order must not come from the global RNG (a shuffling DataLoader
needs a ``generator``, as :func:`segprune.data.make_loader` and the workflows' loaders give it, or a
``DistributedSampler``); with workers the order is exact but their augmentation streams restart. Under DDP
every rank is seeded alike, so the RNG states of rank 0, which alone writes, stand for all ranks.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, RandomSampler

from segprune import checkpoint as model_checkpoint
from segprune._utils import unwrap
from segprune.train.distributed import is_main

_REGULARIZER_ATTRS = ("calls", "guide", "seen")  # BNSparsity's warm-up counter, CAP's guiding EMA


@dataclass
class Progress:
    """Where training stands: the loop updates it, a checkpoint stores it.

    Attributes:
        epoch: The current epoch (0-based).
        batch: Batches of the current epoch done.
        step: Optimizer steps done since the start of training.
        loss_sum: Sum of the batch losses of the current epoch.
        seconds: Training seconds spent in the current epoch.
        history: One row per finished epoch: ``epoch`` (1-based), ``step``, ``loss``, ``lr``, ``seconds``.
        loader_state: State of the loader's generator at the start of the current epoch.
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    loader_state: torch.Tensor | None = None


class Checkpoints:
    """Training checkpoints in one folder: :meth:`save` a new one, :meth:`restore` the newest.

    Args:
        folder: Folder of the ``step-*`` checkpoints and of ``latest``.
        every: Save every ``every`` optimizer steps (0: only at epoch ends).
        keep: Number of checkpoints kept, newest first.
        config: What builds the model (``{"model": name, "model_kwargs": {...}}``, anything else JSON is kept).
        plan: The pruning plan of the model being trained, if it was pruned.
    """

    def __init__(self, folder: str | Path, *, every: int = 0, keep: int = 2, config: dict | None = None,
                 plan=None):
        if every < 0 or keep < 1:
            raise ValueError(f"every must be >= 0 and keep >= 1, got {every}, {keep}")
        self.folder, self.every, self.keep = Path(folder), every, keep
        self.config, self.plan = config or {}, plan

    def due(self, step: int) -> bool:
        """True when a checkpoint is due after optimizer step ``step``."""
        return self.every > 0 and step % self.every == 0

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        pointer = self.folder / "latest"
        return self.folder / pointer.read_text().strip() if pointer.is_file() else None

    def save(self, progress: Progress, *, model, optimizer, scheduler=None, scaler=None, regularizer=None,
             loader=None) -> Path | None:
        """Write a checkpoint of everything (rank 0 only; other ranks return None)."""
        if not is_main():
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"step-{progress.step:07d}"
        final, tmp = self.folder / name, self.folder / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model_checkpoint.save(tmp, unwrap(model), config=self.config, plan=self.plan)
        state = _training_state(progress, optimizer, scheduler, scaler, regularizer, loader)
        tensors: dict[str, torch.Tensor] = {}
        structure = encode(state, tensors, "state")
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(structure))
        if final.exists():  # only when an epoch has no batches: two saves at the same step
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(self.folder / "latest", name)
        self._prune(keep=final)
        return final

    def restore(self, *, model, optimizer, scheduler=None, scaler=None, regularizer=None,
                loader=None) -> Progress | None:
        """Load the newest checkpoint into the given objects; None (and nothing changed) when there is none."""
        folder = self.latest()
        if folder is None:
            return None
        unwrap(model).load_state_dict(load_file(str(folder / "weights.safetensors")))
        state = decode(json.loads((folder / "state.json").read_text()),
                       load_file(str(folder / "state.safetensors")))
        optimizer.load_state_dict(state["optimizer"])
        for obj, key in ((scheduler, "scheduler"), (scaler, "scaler")):
            if obj is not None and state.get(key) is not None:
                obj.load_state_dict(state[key])
        _load_regularizer(regularizer, state.get("regularizer"))
        set_rng_states(state["rng"])
        for generator, saved in zip(_transform_generators(loader), state["transforms"]):
            generator.set_state(saved)
        return Progress(**state["progress"])

    def _prune(self, *, keep: Path) -> None:
        folders = sorted(p for p in self.folder.glob("step-*") if p.is_dir())
        for old in folders[: max(len(folders) - self.keep, 0)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)


def _training_state(progress, optimizer, scheduler, scaler, regularizer, loader) -> dict:
    return {
        "progress": {k: getattr(progress, k) for k in Progress.__dataclass_fields__},
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "regularizer": _regularizer_state(regularizer),
        "rng": rng_states(),
        "transforms": [g.get_state() for g in _transform_generators(loader)],
    }


def _regularizer_state(regularizer) -> dict | None:
    if regularizer is None:
        return None
    if hasattr(regularizer, "state_dict"):
        return regularizer.state_dict()
    return {k: getattr(regularizer, k) for k in _REGULARIZER_ATTRS if hasattr(regularizer, k)}


def _load_regularizer(regularizer, state: dict | None) -> None:
    if regularizer is None or state is None:
        return
    if hasattr(regularizer, "load_state_dict"):
        regularizer.load_state_dict(state)
        return
    for key, value in state.items():
        setattr(regularizer, key, value)


# --- RNG and data order -------------------------------------------------------------------------------------------
def rng_states() -> dict:
    """The states of torch's CPU and CUDA generators, numpy's global one and Python's ``random``."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_states(states: dict) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def _transform_generators(loader) -> list[torch.Generator]:
    """The generators of the dataset's seeded transforms, looking through Subset/ConcatDataset wrappers."""
    found, pending = [], [getattr(loader, "dataset", None)]
    while pending:
        dataset = pending.pop()
        transform = getattr(dataset, "transform", None)
        found += transform.generators() if hasattr(transform, "generators") else []
        pending += list(getattr(dataset, "datasets", []))
        pending += [dataset.dataset] if hasattr(dataset, "dataset") else []
    return found


def epoch_batches(loader, epoch: int, progress: Progress):
    """The batches of ``epoch`` still to do, drawn in the order an uninterrupted run draws them.

    Sets the sampler's epoch (``DistributedSampler``), records the loader generator's state at the start of a
    fresh epoch in ``progress`` or restores it when resuming mid-epoch, and skips the ``progress.batch``
    batches already done without loading them.
    """
    sampler, generator = getattr(loader, "sampler", None), getattr(loader, "generator", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if isinstance(sampler, RandomSampler) and sampler.generator is None and progress.batch:
        warnings.warn("resuming a loader that shuffles from the global RNG: the data order will differ; "
                      "give the DataLoader a generator", stacklevel=2)
    if generator is not None:
        if progress.batch and progress.loader_state is not None:
            generator.set_state(progress.loader_state)
        progress.loader_state = generator.get_state()
    if not progress.batch:
        return loader
    if not isinstance(loader, DataLoader) or loader.batch_sampler is None:
        return _skip_loaded(loader, progress.batch)
    return _with_batch_sampler(loader, _SkipBatches(loader.batch_sampler, progress.batch))


class _SkipBatches:
    """A batch sampler without its first ``skip`` batches (their indices are drawn, the samples never loaded).

    The inner sampler is only iterated at the first ``next``, as DataLoader's own is, so the generator draws
    happen in the same order as in an uninterrupted epoch.
    """

    def __init__(self, batch_sampler, skip: int):
        self.batch_sampler, self.skip = batch_sampler, skip

    def __iter__(self):
        batches = iter(self.batch_sampler)
        for _ in range(self.skip):
            next(batches, None)
        yield from batches

    def __len__(self) -> int:
        return max(len(self.batch_sampler) - self.skip, 0)


def _with_batch_sampler(loader: DataLoader, batch_sampler) -> DataLoader:
    workers = loader.num_workers
    return DataLoader(loader.dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                      prefetch_factor=loader.prefetch_factor if workers else None,
                      persistent_workers=loader.persistent_workers)


def _skip_loaded(batches, skip: int):
    """Any other iterable: the skipped batches are produced and dropped."""
    iterator = iter(batches)
    for _ in range(skip):
        next(iterator, None)
    return iterator


# --- tensors to safetensors, the rest to JSON -----------------------------------------------------------------------
def encode(obj, tensors: dict[str, torch.Tensor], key: str):
    """A JSON-able copy of ``obj`` with each tensor moved into ``tensors`` under a key derived from ``key``.

    Tuples, numpy arrays and dicts with non-string keys are tagged so that :func:`decode` gives them back as
    they were (optimizer states are keyed by int, Adam's betas are a tuple). Anything else raises TypeError:
    nothing is pickled.
    """
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (list, tuple)):
        items = [encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        return {"__items__": [[encode(k, tensors, f"{key}.k{i}"), encode(v, tensors, f"{key}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {key} without pickle")


def decode(obj, tensors: dict[str, torch.Tensor]):
    """The inverse of :func:`encode`."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {decode(k, tensors): decode(v, tensors) for k, v in obj["__items__"]}
    return {k: decode(v, tensors) for k, v in obj.items()}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
