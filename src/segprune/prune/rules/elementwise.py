"""Elementwise ops: pass-through (activations, dropout, pooling, interpolate, pad), broadcasting binary ops
(add/mul/where: a size-1 channel dim couples nothing), raw per-channel parameters, prelu."""

from __future__ import annotations

from segprune._utils import tensors
from segprune.prune.rules.base import _BINARY, rule, unknown
from segprune.prune.surgery import surgery_for

# --- pass-through: same channels in and out --------------------------------------------------------
_UNARY = (
    "relu relu6 leaky_relu elu selu celu gelu silu mish hardswish hardsigmoid hardtanh sigmoid tanh softplus "
    "softsign tanhshrink threshold logsigmoid abs neg exp log log1p sqrt rsqrt square reciprocal sign sin cos "
    "clamp clip clamp_min clamp_max nan_to_num floor ceil round trunc frac erf "
    "dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout "
    "contiguous clone detach float double half bfloat16 to type type_as cpu cuda requires_grad "
    "zeros_like ones_like empty_like full_like rand_like randn_like fill zero "
    "max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d lp_pool1d lp_pool2d "
    "max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices "
    "adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d "
    "adaptive_max_pool3d adaptive_max_pool1d_with_indices adaptive_max_pool2d_with_indices "
    "adaptive_max_pool3d_with_indices interpolate upsample upsample_bilinear upsample_nearest pad identity"
).split()


@rule(*_UNARY)
def pass_through(st, args, kwargs, out):
    src = next((st.get(t) for t in tensors((args, kwargs)) if st.get(t) is not None), None)
    if src is None:
        return
    for t in tensors(out):
        if t.dim() > src.cdim and t.shape[src.cdim] == len(src.ids):
            st.set(t, src.ids, src.cdim)
        else:
            unknown(st, "a pass-through op that changed the channel count", args, kwargs, out)


# --- elementwise with broadcasting ----------------------------------------------------------------


@rule(*_BINARY)
def elementwise(st, args, kwargs, out):
    """Inputs broadcast onto the output; a size-1 channel dim couples nothing."""
    out_t = next(tensors(out), None)
    if out_t is None:
        return
    ndim = out_t.dim()
    coupled, anchor = [], None
    for t in tensors((args, kwargs)):
        info = st.get(t)
        pos = None if info is None else info.cdim + ndim - t.dim()  # right-aligned broadcasting
        if info is not None and t.shape[info.cdim] > 1:
            coupled.append((info, pos))
            anchor = anchor or (info, pos)
    if anchor is None:
        return _single_channel(st, args, kwargs, out_t)
    info, pos = anchor
    if any(p != pos for _, p in coupled):
        return unknown(st, "elementwise op on differently laid-out channels", args, kwargs, out)
    for other, _ in coupled[1:]:
        st.union(info.ids, other.ids)
    _freeze_constants(st, args, kwargs, out_t, pos, info)
    st.set(out_t, info.ids, pos)


def _single_channel(st, args, kwargs, out_t):
    """Every traced operand has one channel: the output keeps it, or broadcasts it onto nobody's channels."""
    traced = [(st.get(t), t) for t in tensors((args, kwargs)) if st.get(t) is not None]
    if not traced:
        return
    info, t = traced[0]
    pos = info.cdim + out_t.dim() - t.dim()
    if out_t.shape[pos] != 1:
        return st.set_free(out_t, pos)
    for other, _ in traced[1:]:
        st.union(info.ids, other.ids)
    st.set(out_t, info.ids, pos)


def _freeze_constants(st, args, kwargs, out_t, pos, info):
    """An untraced operand with C values along the channel dim would keep its C values after pruning: a raw
    per-channel parameter (layer scale, `x * gamma`) is bound and cut with the channels; anything else (a
    constant) freezes them."""
    ndim = out_t.dim()
    for t in tensors((args, kwargs)):
        offset = pos - (ndim - t.dim())
        if st.get(t) is None and 0 <= offset < t.dim() and t.shape[offset] > 1:
            param = _per_channel_parameter(st, t, offset)
            if param is not None:
                st.bind(param[0], f"param:{param[1]}", info.ids)
                continue
            st.freeze(info.ids, f"an untraced tensor of shape {tuple(t.shape)} (a constant or a raw parameter) "
                                f"meets these channels (in {st.where})")


def _per_channel_parameter(st, t, dim):
    """(module, parameter name) when `t` is a registered parameter, or a view of one, holding one value per channel
    along `dim` and nothing else (its other dims are 1)."""
    if any(size != 1 for d, size in enumerate(t.shape) if d != dim):
        return None
    for name, module in st.params_by_ptr.get(t.data_ptr(), ()):
        param = getattr(module, name)
        if param.numel() == t.numel() and sum(size != 1 for size in param.shape) == 1:
            return st.owners[id(param)][0], name
    return None


@rule("prelu")
def prelu(st, args, kwargs, out):
    info, weight = st.get(args[0]), args[1]
    owner = st.owners.get(id(weight))
    if info is None:
        return
    if weight.numel() > 1:
        if owner is None or surgery_for(owner[1]) is None or info.cdim != 1:
            return unknown(st, "prelu with an unsupported weight", args, kwargs, out)
        st.bind(owner[0], "out", info.ids)
    st.set(out, info.ids, info.cdim)
