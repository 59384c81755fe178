"""An export form of max pooling with indices that every runtime runs fast.

ONNX's ``MaxPool`` with an ``Indices`` output is what the exporters emit for ``nn.MaxPool2d(return_indices=True)``
(SegNet's encoder); OpenVINO's CPU plugin has no optimised kernel for it and runs a reference one: 4.2 s of
SegNet-VGG16-BN's 6.5 s at 360×480 on one thread, against 54 ms for the five max-unpoolings (``ScatterND``). For
non-overlapping windows (stride = kernel, no padding or dilation) the same values and indices come from a plain
``MaxPool`` and an ``ArgMax`` over each window's elements, which every runtime has fast kernels for. The indices are
identical, ties included: both pick the first maximum in row-major order within a window.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class WindowArgmaxPool(nn.Module):
    """``nn.MaxPool2d(k, stride=k, return_indices=True)`` as ``max_pool2d`` + ``argmax`` over the k×k windows."""

    def __init__(self, kernel: int):
        super().__init__()
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, (n, c, h, w) = self.kernel, x.shape
        hk, wk = h // k, w // k
        windows = x[..., : hk * k, : wk * k].reshape(n, c, hk, k, wk, k).permute(0, 1, 2, 4, 3, 5)
        first = windows.reshape(n, c, hk, wk, k * k).argmax(dim=-1)  # the first maximum, as max_pool2d picks it
        rows = torch.arange(hk, device=x.device).mul(k).view(hk, 1)
        cols = torch.arange(wk, device=x.device).mul(k).view(1, wk)
        indices = (rows + torch.div(first, k, rounding_mode="floor")) * w + cols + first % k
        return F.max_pool2d(x, k, k), indices


def _replaceable(m: nn.Module) -> bool:
    size = lambda v: v if isinstance(v, int) else (v[0] if len(set(v)) == 1 else None)  # noqa: E731
    return (isinstance(m, nn.MaxPool2d) and m.return_indices and not m.ceil_mode and size(m.padding) == 0
            and size(m.dilation) == 1 and size(m.kernel_size) is not None
            and size(m.stride or m.kernel_size) == size(m.kernel_size))


def export_form(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """``model`` with every replaceable max pooling with indices swapped for :class:`WindowArgmaxPool` (a copy; the
    model itself when there is none), and the names of the swapped layers."""
    names = [name for name, m in model.named_modules() if _replaceable(m)]
    if not names:
        return model, []
    model = copy.deepcopy(model)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        pool = model.get_submodule(name)
        kernel = pool.kernel_size if isinstance(pool.kernel_size, int) else pool.kernel_size[0]
        setattr(model.get_submodule(parent) if parent else model, leaf, WindowArgmaxPool(kernel))
    return model, names
