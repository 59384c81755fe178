"""Fold BatchNorm into the convolution before it, for inference, in any ``nn.Module``.

Pairs are found by running the model, not by reading its structure: the order of an
``nn.Sequential`` or of attributes says nothing about data flow in a hand-written ``forward``,
and a conv output that also feeds another branch must keep its unnormalised values. The model is
run once on an example input with hooks on every conv and BN module and a
``TorchFunctionMode`` that records, for every tensor, which module call each op reading it ran
in. A pair is folded only when the conv and the BN each ran once, the BN's input is the very
tensor the conv returned, nothing else read that tensor, the model does not return it, and the
conv's parameters are its own.

Folding: with s = gamma / sqrt(var + eps) per output channel, W' = W * s and b' = (b - mean) * s + beta.
"""

from __future__ import annotations

import copy
from collections import Counter, defaultdict

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.utils._pytree import tree_flatten

from segprune._utils import eval_mode
from segprune.prune.record import OpRecorder, module_calls

_T = torch.Tensor
# Reads of metadata only: a BN checking ``input.dim()`` or a decoder reading ``x.shape`` does not use the values.
_METADATA = frozenset(
    [_T.dim, _T.ndimension, _T.size, _T.numel, _T.nelement, _T.stride, _T.storage_offset, _T.is_contiguous]
    + [_T.is_floating_point, _T.is_complex, _T.get_device, _T.element_size, _T.data_ptr, _T.__len__]
    + [getattr(_T, name).__get__ for name in ("shape", "ndim", "dtype", "device", "is_cuda", "layout")]
    + [getattr(_T, name).__get__ for name in ("requires_grad", "grad_fn", "is_leaf")]
)


def _tensors(tree) -> list[torch.Tensor]:
    """Every tensor in a nest of tuples, lists and dicts."""
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


class _Trace(OpRecorder):
    """Records which module call each op that reads a tensor ran in, keyed by ``id(tensor)``.

    ``owners`` is the stack of conv/BN module calls in progress (kept by the hooks). Every tensor
    seen is kept alive in ``keep`` until the trace is dropped, so that no id is reused by a new tensor.
    """

    def __init__(self):
        super().__init__()
        self.owners: list[str] = []
        self.readers: dict[int, list[str | None]] = defaultdict(list)
        self.calls: Counter[str] = Counter()
        self.outputs: dict[str, object] = {}  # conv name -> what it returned
        self.inputs: dict[str, object] = {}  # BN name -> its first positional argument
        self.keep: list = []

    def record(self, func, args, kwargs, out) -> None:
        if func not in _METADATA:
            owner = self.owners[-1] if self.owners else None
            for tensor in _tensors((args, kwargs)):
                self.readers[id(tensor)].append(owner)
        self.keep.append((args, kwargs, out))

    def enter(self, name: str, module: nn.Module, args) -> None:
        """Forward pre-hook: a conv or BN call starts."""
        self.owners.append(name)
        if isinstance(module, _BatchNorm):
            self.inputs[name] = args[0] if args else None

    def leave(self, name: str, module: nn.Module, args, output) -> None:
        """Forward hook: a conv or BN call ends."""
        self.owners.pop()
        self.calls[name] += 1
        if isinstance(module, _ConvNd):
            self.outputs[name] = output


def _trace(model: nn.Module, example_input) -> tuple[_Trace, object]:
    """Run ``model`` once in eval mode under a :class:`_Trace`; returns the trace and the output."""
    trace = _Trace()
    with module_calls(model, trace.enter, trace.leave, kinds=(_ConvNd, _BatchNorm)), eval_mode(model), \
            torch.no_grad(), trace:
        output = model(example_input)
    return trace, output


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    """Ids of parameters registered in more than one place (tied weights)."""
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {pid for pid, n in counts.items() if n > 1}


def _owns_parameters(trace: _Trace, conv: nn.Module, conv_name: str, shared: set[int]) -> bool:
    """The conv's weight is a plain parameter, and its parameters are neither tied nor read elsewhere."""
    params = dict(conv.named_parameters(recurse=False))
    if "weight" not in params:  # weight computed by a parametrisation or weight_norm: folding would not stick
        return False
    return all(id(p) not in shared and set(trace.readers[id(p)]) <= {conv_name} for p in params.values())


def _fusable(trace: _Trace, model: nn.Module, conv_name: str, bn_name: str, returned: set[int]) -> bool:
    """Whether the BN ``bn_name`` can be folded into the conv ``conv_name`` whose output it reads."""
    conv, bn, out = model.get_submodule(conv_name), model.get_submodule(bn_name), trace.outputs[conv_name]
    return (
        trace.calls[conv_name] == 1
        and trace.calls[bn_name] == 1
        and id(out) not in returned
        and set(trace.readers[id(out)]) == {bn_name}
        and bn.running_mean is not None
        and bn.running_var is not None
        and bn.num_features == conv.out_channels
        and _owns_parameters(trace, conv, conv_name, _shared_parameter_ids(model))
    )


def fusable_pairs(model: nn.Module, example_input) -> list[tuple[str, str]]:
    """Conv/BN pairs of ``model`` that :func:`fuse_conv_bn` would fold.

    Args:
        model: Any module; it is run once in eval mode (its modes are restored) and not changed.
        example_input: Input for one forward pass, on the model's device.

    Returns:
        (conv name, BN name) pairs as in ``model.named_modules()``, in the order the BNs ran.
    """
    trace, output = _trace(model, example_input)
    conv_of = {id(out): name for name, out in trace.outputs.items() if isinstance(out, torch.Tensor)}
    returned = {id(t) for t in _tensors(output)}
    pairs = [(conv_of[id(x)], bn) for bn, x in trace.inputs.items() if id(x) in conv_of]
    return [(conv, bn) for conv, bn in pairs if _fusable(trace, model, conv, bn, returned)]


def _scale_output_channels(conv: nn.Module, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``weight`` with output channel o multiplied by ``scale[o]``."""
    ones = [1] * (weight.dim() - 2)
    if isinstance(conv, _ConvTransposeNd):
        # Transposed weights are (in, out // groups, *k): output channel g * (out // groups) + j is
        # column j of the rows of group g.
        g, (c_in, c_out) = conv.groups, weight.shape[:2]
        grouped = weight.reshape(g, c_in // g, c_out, *weight.shape[2:])
        return (grouped * scale.reshape(g, 1, c_out, *ones)).reshape(weight.shape)
    return weight * scale.reshape(-1, 1, *ones)


@torch.no_grad()
def fold_bn_into_conv(conv: nn.Module, bn: _BatchNorm) -> None:
    """Fold the eval-mode ``bn`` into ``conv`` in place (computed in float64, stored in the conv's dtype)."""
    scale = (bn.running_var.double() + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    conv.weight.copy_(_scale_output_channels(conv, conv.weight.double(), scale))
    new_bias = (bias * scale + shift).to(conv.weight)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(new_bias)


def fuse_conv_bn(model: nn.Module, example_input) -> nn.Module:
    """A copy of ``model`` in eval mode with every fusable BatchNorm folded into its conv.

    Folded BNs become ``nn.Identity``; see :func:`fusable_pairs` for which pairs qualify. The copy
    computes what ``model`` computes in eval mode; it is meant for inference only.

    Args:
        model: Any module; it is left unchanged.
        example_input: Input for one forward pass, on the model's device.

    Returns:
        The fused copy, in eval mode.
    """
    fused = copy.deepcopy(model).eval()
    for conv_name, bn_name in fusable_pairs(fused, example_input):
        fold_bn_into_conv(fused.get_submodule(conv_name), fused.get_submodule(bn_name))
        fused.set_submodule(bn_name, nn.Identity())
    return fused
