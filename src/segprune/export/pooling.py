"""Export forms of pooling layers that every runtime runs fast.

ONNX's ``MaxPool`` with an ``Indices`` output is what the exporters emit for ``nn.MaxPool2d(return_indices=True)``
(SegNet's encoder); OpenVINO's CPU plugin has no optimised kernel for it and runs a reference one: 4.2 s of
SegNet-VGG16-BN's 6.5 s at 360×480 on one thread, against 54 ms for the five max-unpoolings (``ScatterND``). For
non-overlapping windows (stride = kernel, no padding or dilation) the same values and indices come from a plain
``MaxPool`` and an ``ArgMax`` over each window's elements, which every runtime has fast kernels for. The indices are
identical, ties included: both pick the first maximum in row-major order within a window.

``nn.AdaptiveAvgPool2d`` to bins that do not divide the input (PSPNet's 3×3 and 6×6 on a 64×64 map at 512²): the
TorchScript exporter refuses it and the dynamo exporter writes gathered overlapping windows, a Transpose and a
ReduceMean, which OpenVINO runs in a reference kernel (results/latency_step.json). The same averages are two small
matrix products, ``rows @ x @ cols``, with each bin's averaging weights over PyTorch's own windows (start
⌊i·H/b⌋, end ⌈(i+1)·H/b⌉), built from the input's shape so dynamic exports stay dynamic.
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


class MatrixAdaptiveAvgPool(nn.Module):
    """``nn.AdaptiveAvgPool2d(output_size)`` as ``rows @ x @ cols``: the averaging matrices of its windows."""

    def __init__(self, output_size: tuple[int | None, int | None]):
        super().__init__()
        self.output_size = output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        bins_h, bins_w = (b if b is not None else size for b, size in zip(self.output_size, (h, w)))
        return _averaging(bins_h, h, x) @ x @ _averaging(bins_w, w, x).transpose(0, 1)


def _averaging(bins: int, size, like: torch.Tensor) -> torch.Tensor:
    """(bins, size): row i averages PyTorch's adaptive window i, [floor(i*size/bins), ceil((i+1)*size/bins))."""
    i = torch.arange(bins, device=like.device).view(-1, 1)
    j = torch.arange(size, device=like.device).view(1, -1)
    start, end = torch.div(i * size, bins, rounding_mode="floor"), torch.div((i + 1) * size + bins - 1, bins,
                                                                            rounding_mode="floor")
    inside = ((j >= start) & (j < end)).to(like.dtype)
    return inside / inside.sum(dim=1, keepdim=True)


def _pairs(v) -> tuple:
    return (v, v) if isinstance(v, int) or v is None else tuple(v)


def _adaptive(m: nn.Module) -> bool:
    """An adaptive average pooling to more than one bin (one bin exports as a plain global mean everywhere)."""
    return isinstance(m, nn.AdaptiveAvgPool2d) and any(b is None or b > 1 for b in _pairs(m.output_size))


def _replaceable(m: nn.Module) -> bool:
    size = lambda v: v if isinstance(v, int) else (v[0] if len(set(v)) == 1 else None)  # noqa: E731
    return (isinstance(m, nn.MaxPool2d) and m.return_indices and not m.ceil_mode and size(m.padding) == 0
            and size(m.dilation) == 1 and size(m.kernel_size) is not None
            and size(m.stride or m.kernel_size) == size(m.kernel_size))


def export_form(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """``model`` with every replaceable max pooling with indices swapped for :class:`WindowArgmaxPool` and every
    adaptive average pooling to several bins for :class:`MatrixAdaptiveAvgPool` (a copy; the model itself when
    there is none), and the names of the swapped layers."""
    names = [name for name, m in model.named_modules() if _replaceable(m) or _adaptive(m)]
    if not names:
        return model, []
    model = copy.deepcopy(model)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        pool = model.get_submodule(name)
        if _adaptive(pool):
            swap = MatrixAdaptiveAvgPool(_pairs(pool.output_size))
        else:
            swap = WindowArgmaxPool(pool.kernel_size if isinstance(pool.kernel_size, int) else pool.kernel_size[0])
        setattr(model.get_submodule(parent) if parent else model, leaf, swap)
    return model, names
