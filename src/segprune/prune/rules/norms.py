"""Norms: batch/instance norm carry the channels, group norm ties each group, layer/RMS norm over the channels
is inexact (frozen unless allowed)."""

from __future__ import annotations

import numpy as np

from segprune.prune.rules.base import _arg, rule, unknown
from segprune.prune.surgery import surgery_for


@rule("batch_norm", "instance_norm")
def norm(st, args, kwargs, out):
    info = st.get(args[0])
    if info is None:
        return
    # batch_norm and instance_norm share the layout (input, running_mean, running_var, weight, bias, ...)
    holders = [_arg(args, kwargs, i, n) for i, n in ((1, "running_mean"), (3, "weight"))]
    owners = [st.owners.get(id(t)) for t in holders if t is not None]
    if info.cdim != 1:
        return unknown(st, "a norm over a non-channel dim", args, kwargs, out)
    if owners:
        if surgery_for(owners[0][1]) is None:
            return unknown(st, f"{type(owners[0][1]).__name__} (no surgery rule)", args, kwargs, out)
        st.bind(owners[0][0], "out", info.ids)
    st.set(out, info.ids, 1)


@rule("group_norm")
def group_norm(st, args, kwargs, out):
    x, groups = args[0], _arg(args, kwargs, 1, "num_groups")
    info = st.get(x)
    if info is None:
        return
    weight = _arg(args, kwargs, 2, "weight")
    owner = st.owners.get(id(weight)) if weight is not None else None
    if info.cdim != 1 or (weight is not None and (owner is None or surgery_for(owner[1]) is None)):
        return unknown(st, "group_norm with an unsupported layout or weight", args, kwargs, out)
    for members in np.split(info.ids, groups):  # statistics are shared inside a group: cut whole groups
        st.union_all(members)
    if owner is not None:
        st.bind(owner[0], "out", info.ids)
    st.set(out, info.ids, 1)


@rule("layer_norm", "rms_norm")
def layer_norm(st, args, kwargs, out):
    """A norm over the last dims. Over the channels alone (a transformer's LayerNorm, ConvNeXt's channels-last
    LayerNorm2d) removing a channel changes the mean and variance the others are normalised with: not exact, so
    frozen unless the user allows it (allow_approximate=("layer_norm",)); verify then measures the change."""
    x, shape = args[0], _arg(args, kwargs, 1, "normalized_shape")
    info = st.get(x)
    if info is None:
        return
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    weight = _arg(args, kwargs, 2, "weight")
    owner = st.owners.get(id(weight)) if weight is not None else None
    if info.cdim < x.dim() - len(shape):  # normalises other dims: the channels pass through
        return st.set(out, info.ids, info.cdim)
    if len(shape) != 1 or (weight is not None and (owner is None or surgery_for(owner[1]) is None)):
        return unknown(st, f"{st.current_op} over the channels and other dims, or with a computed weight", args,
                       kwargs, out)
    if owner is not None:
        st.bind(owner[0], "out", info.ids)
    name = st.current_op
    if name in st.allow_approximate:
        st.approximate.update((e, f"{name} (in {st.where})") for e in info.ids.tolist())
    else:
        st.freeze(info.ids, f"{name} over the channels (in {st.where}) makes their removal inexact (the others' "
                            f"statistics change); pass allow_approximate=('{name}',) to prune them anyway")
    st.set(out, info.ids, info.cdim)
