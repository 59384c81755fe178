"""Trace a model by running it, at the function level, and let each op's rule record its channels.

Why function level (TorchFunctionMode) and not autograd: the decoder of SegNet consumes max-pool
*indices*, integer tensors that autograd never sees; an autograd trace misses that coupling and
produces a model that runs and computes something else. Here every torch function call is seen,
whatever its dtype, with Python control flow already resolved.

The trace runs the model in eval mode and in train mode (so auxiliary heads count) under no_grad,
with BatchNorm evaluated with its running statistics, and restores every module's mode and every
buffer afterwards: weights, statistics and modes are left exactly as they were.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_map

from segprune._utils import tensors
from segprune.prune.record import OpRecorder
from segprune.prune.rules import RULES, _dim, constant, op_name, unknown
from segprune.prune.sizes import attribute_sizes, channel_size
from segprune.prune.state import TraceState
from segprune.prune.zeros import nonzero_tag


class _Recorder(OpRecorder):
    """Runs each op, then hands it to its rule. Ops are seen once: inner calls run with the mode off."""

    def __init__(self, st: TraceState):
        super().__init__()
        self.st = st

    def prepare(self, func, args, kwargs):
        return _batch_norm_without_update(args, kwargs) if op_name(func) == "batch_norm" else (args, kwargs)

    def call(self, func, args, kwargs):
        shape_only = op_name(func) in _SHAPE_ONLY and self.st.shape_only
        out = _shape_only(func, args, kwargs) if shape_only else func(*args, **kwargs)
        return _sized(self.st, func, args, kwargs, out)

    def record(self, func, args, kwargs, out) -> None:
        st, name = self.st, op_name(func)
        st.calls.setdefault(st.mode, set()).add((st.module_path, name))
        if any(st.get(t) is not None for t in tensors((args, kwargs))) or _layer_of_constants(st, name, args, kwargs):
            st.current_op = name
            RULES.get(name, lambda *a: unknown(st, name, *a[1:]))(st, args, kwargs, out)
            if name not in RULES or RULES[name] is not constant:
                _untracked_outputs(st, name, args, kwargs, out)
            _tag_nonzero(st, name, args, kwargs, out)


def _layer_of_constants(st, name, args, kwargs) -> bool:
    """A module's conv or linear layer applied to untraced tensors (DETR's learned queries through a q
    projection) still makes channels: its rule runs, so its outputs are traced and its MACs counted."""
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    return name in _SHAPE_ONLY and isinstance(weight, torch.Tensor) and id(weight) in st.owners


def _sized(st, func, args, kwargs, out):
    """`x.shape`, `x.size()` and `x.size(d)` of a traced tensor give its channel dim as a Size (sizes.py)."""
    name = op_name(func)
    if name == "get":  # a property: Tensor.shape is the getset descriptor's __get__
        name = getattr(getattr(func, "__self__", None), "__name__", "")
    info = st.get(args[0]) if name in ("shape", "size") and args else None
    if info is None or st.is_free(info):
        return out
    if isinstance(out, torch.Size):
        dims = list(out)
        dims[info.cdim] = channel_size(dims[info.cdim], info.ids)
        return torch.Size(dims)
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if isinstance(out, int) and dim is not None and _dim(dim, args[0].dim()) == info.cdim:
        return channel_size(out, info.ids)
    return out


def _tag_nonzero(st, name, args, kwargs, out):
    """Mark outputs where a removed channel is no longer zero (see zeros.py)."""
    tag = nonzero_tag(st, name, args, kwargs)
    for t in tensors(out):
        info = st.get(t)
        if info is not None:
            info.nonzero = tag


# Channel structure depends on shapes, not values: convolutions and linear layers (nearly all the time of a
# forward pass) are evaluated on the meta device and return zeros of the right shape.
_SHAPE_ONLY = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear"}


def _shape_only(func, args, kwargs):
    to_meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t  # noqa: E731
    out = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))
    return torch.zeros(out.shape, dtype=out.dtype, device=args[0].device)


def _untracked_outputs(st, name, args, kwargs, out):
    """A safety net under the rules: a tensor that came out of traced inputs but carries no channels would let
    its producers be cut while its consumers keep their widths. Treat the op as unknown instead."""
    if any(t.dim() >= 1 and st.get(t) is None for t in tensors(out)):
        unknown(st, f"{name} (its output channels could not be followed)", args, kwargs, out)


def _batch_norm_without_update(args, kwargs):
    """Evaluate train-mode BatchNorm with running statistics: nothing is updated, and a batch of one
    through a 1x1 pooled branch (PSPNet's PPM) does not fail."""
    has_stats = (args[1] if len(args) > 1 else kwargs.get("running_mean")) is not None
    if not has_stats:
        return args, kwargs
    if len(args) > 5:
        return (*args[:5], False, *args[6:]), kwargs
    return args, {**kwargs, "training": False}


def as_call(example_inputs) -> tuple[tuple, dict]:
    """A tensor, a tuple of positional inputs, or a dict of keyword inputs -> (args, kwargs)."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def param_owners(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """id(parameter or buffer) -> (qualified module name, module); the first name of a shared module wins."""
    owners = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            if t is not None:
                owners.setdefault(id(t), (name, module))
    return owners


def trace(model: nn.Module, example_inputs, *, modes: Sequence[str] = ("eval", "train"),
          shape_only: bool = True, allow_approximate: Sequence[str] = ()) -> TraceState:
    """Run `model` once per mode on `example_inputs` and return the channel facts the rules recorded.

    With `shape_only`, convolutions and linear layers compute only their output shape (zeros come out):
    the trace is then several times faster, and a model whose forward branches on values follows the
    path zeros take. Pass False to trace with real values.
    """
    st = TraceState()
    st.shape_only = shape_only
    st.allow_approximate = tuple(allow_approximate)
    st.owners = param_owners(model)
    st.modules = dict(model.named_modules())
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            st.params_by_ptr.setdefault(param.data_ptr(), []).append((name, module))
    args, kwargs = as_call(example_inputs)
    for t in tensors((args, kwargs)):
        st.set_opaque(t, "a model input")
    with _ModuleStack(model, st), _Restore(model), attribute_sizes(model), torch.no_grad():
        for mode in modes:
            model.train(mode == "train")
            st.mode = mode
            with _Recorder(st):
                out = model(*args, **kwargs)
            for t in tensors(out):
                info = st.get(t)
                if info is not None:
                    st.freeze(info.ids, "reaches the model's output")
    return st


class _Restore:
    """Put back every module's train/eval flag and every buffer (BN statistics, counters)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.buffers = [(b, b.detach().clone()) for b in self.model.buffers()]

    def __exit__(self, *exc):
        for module, training in self.modes:
            module.training = training
        with torch.no_grad():
            for buffer, saved in self.buffers:
                buffer.copy_(saved)


class _ModuleStack:
    """Keep `st.module_path` naming the innermost module running, so warnings can point at it."""

    def __init__(self, model: nn.Module, st: TraceState):
        self.names = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self.names.setdefault(id(module), name)
        self.st, self.stack = st, []

    def _pre(self, module, args):
        self.stack.append(self.st.module_path)
        self.st.module_path = self.names.get(id(module), self.st.module_path)

    def _post(self, module, args, out):
        self.st.module_path = self.stack.pop() if self.stack else ""

    def __enter__(self):
        from torch.nn.modules import module as m

        self.handles = [m.register_module_forward_pre_hook(self._pre),
                        m.register_module_forward_hook(self._post, always_call=True)]

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
