"""Producers and consumers: convolutions and linear layers create channels (out) and consume them (in)."""

from __future__ import annotations

import numpy as np

from segprune.prune.rules.base import _arg, rule, unknown
from segprune.prune.surgery import surgery_for


# --- producers and consumers ------------------------------------------------------------------------
def _owner(st, param, name):
    """(module name, module) owning a weight, or None when the weight is computed or not a parameter."""
    owner = st.owners.get(id(param))
    if owner is None or surgery_for(owner[1]) is None:
        return None
    return owner


def _note_offset(st, consumer, info):
    """A consumer reading channels that an op between made nonzero: prune measures and folds (fold.py)."""
    if info is not None and info.nonzero:
        st.offsets.setdefault(consumer, info.nonzero)


def _produce(st, module_name, n):
    if module_name not in st.producers:
        ids = st.fresh(n)
        st.created.update(ids.tolist())
        st.producers[module_name] = ids
    return st.producers[module_name]


@rule("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv(st, args, kwargs, out):
    x, weight = args[0], _arg(args, kwargs, 1, "weight")
    transposed = "transpose" in st.current_op
    groups = _arg(args, kwargs, 6, "groups", 1)
    info, owner = st.get(x), _owner(st, weight, "weight")
    if owner is None or (info is not None and info.cdim != 1) or (transposed and groups > 1):
        return unknown(st, f"{st.current_op} with an unsupported weight or layout ({_conv_trouble(owner, info)})",
                       args, kwargs, out)
    name = owner[0]
    out_ids = _produce(st, name, out.shape[1])
    in_ids = info.ids if info is not None else st.fresh(x.shape[1])
    if groups == 1:
        st.bind(name, "in", in_ids)
        _note_offset(st, name, info)
    else:  # a conv group's inputs and outputs live and die together (depthwise: one in, k outs)
        for g_in, g_out in zip(np.split(in_ids, groups), np.split(out_ids, groups)):
            st.union_all(np.concatenate([g_in, g_out]))
    st.bind(name, "out", out_ids)
    st.set(out, out_ids, 1)
    # MACs as torch.utils.flop_counter counts them: every weight is used once per output pixel (input pixel
    # for a transposed conv), whatever the groups
    side = x if transposed else out
    st.count_macs(name, side.numel() // side.shape[1] * weight.numel())


def _conv_trouble(owner, info) -> str:
    """Say which: a computed weight (weight standardisation: removing an input channel would change the others'
    standardised weights), a layer without surgery, channels not on dim 1, or a grouped transposed conv."""
    if owner is None:
        return "a computed weight, e.g. weight standardisation, or a layer type without surgery"
    if info is not None and info.cdim != 1:
        return f"its input's channels are on dim {info.cdim}, not 1"
    return "grouped transposed convolution"


@rule("linear")
def linear(st, args, kwargs, out):
    x, weight = args[0], _arg(args, kwargs, 1, "weight")
    info, owner = st.get(x), _owner(st, weight, "weight")
    if owner is None:
        return unknown(st, "linear with a computed weight", args, kwargs, out)
    if info is not None and info.cdim == x.dim() - 1:
        st.bind(owner[0], "in", info.ids)
        _note_offset(st, owner[0], info)
    elif info is not None:  # the traced dim passes through; the features are not a traced channel
        st.freeze(info.ids, f"{owner[0]} consumes a dim other than the traced channels")
    out_ids = _produce(st, owner[0], out.shape[-1])
    st.bind(owner[0], "out", out_ids)
    st.set(out, out_ids, out.dim() - 1)
    st.count_macs(owner[0], out.numel() * weight.shape[1])
