"""Small helpers every floor shares, in one place so each has one meaning (imports nothing of segprune).

- ``IGNORE_INDEX``: the label no loss or metric counts (void, unlabelled, out of the image).
- ``eval_mode``: eval mode for a block, then every submodule's *own* mode restored. Restoring only the top module's
  flag (``model.train(was)``) would switch on a BatchNorm a user had frozen in eval mode inside a training model.
- ``tensors``: every tensor inside nested arguments (lists, tuples, dicts), in order.
- ``logits``: the main prediction of a model's output, a tensor or the ``"out"`` entry of a dict.
- ``unwrap``: the module inside DistributedDataParallel (or the model itself).
- ``deprecated``: the one wording of a deprecation warning, with the version that removes the old spelling.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

IGNORE_INDEX = 255
DEPRECATED_SINCE, REMOVED_IN = "0.1.0", "0.3.0"  # deprecated in this version, dropped in that one


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Context manager: ``model`` in eval mode for the block, then every submodule's own mode restored."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


def tensors(obj):
    """Every tensor inside nested args (lists, tuples, dicts)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors(item)


def logits(output) -> torch.Tensor:
    """The main logits of a model's output: the tensor itself, or its ``"out"`` entry."""
    return output["out"] if isinstance(output, dict) else output


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or ``model`` itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def deprecated(old: str, new: str, *, stacklevel: int = 2) -> None:
    """Warn that ``old`` is deprecated in favour of ``new``; one message so every deprecation names the same
    versions, and users know how long the old spelling still works.

    Args:
        old: The old spelling, e.g. ``"prune(method=...)"``.
        new: What to write instead.
        stacklevel: As for ``warnings.warn``, counted from the caller of this function.
    """
    warnings.warn(f"{old} is deprecated since {DEPRECATED_SINCE}, removed in {REMOVED_IN}: {new}",
                  DeprecationWarning, stacklevel=stacklevel + 1)
