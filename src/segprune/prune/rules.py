"""Channel rules: for every op the tracer records, which channels of its tensors are the same.

A rule is `rule(st, args, kwargs, out)`. It reads what the inputs carry (`st.get`) and records what
the outputs carry (`st.set`), unions channels that must be cut together, binds module weights to
channels, and freezes what it cannot reason about. Rules are keyed by the op's name, with in-place
(`add_`), reflected (`__radd__`) and dunder (`__add__`) spellings folded onto one name.

Ops are seen at the `torch.nn.functional` / `torch` / `Tensor` method level (TorchFunctionMode), so
integer tensors (max-pool indices) and tensors that need no gradient are traced too.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from segprune._utils import tensors
from segprune.prune.state import TraceState
from segprune.prune.surgery import surgery_for

RULES: dict[str, callable] = {}


def rule(*names):
    def register(fn):
        for name in names:
            RULES[name] = fn
        return fn

    return register


def op_name(func) -> str:
    """Fold `__iadd__`, `__radd__`, `add_` onto `add`; keep everything else as named."""
    name = getattr(func, "__name__", "") or ""
    bare = name.strip("_")  # add_ -> add, __add__ -> add
    if name.startswith("__") and bare[:1] in "ir" and bare[1:] in _BINARY:
        bare = bare[1:]  # __iadd__, __radd__ -> add
    return bare


def _arg(args, kwargs, index, name, default=None):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _dim(d, ndim):
    return d + ndim if d < 0 else d


def unknown(st: TraceState, name: str, args, kwargs, out) -> None:
    """No rule: freeze every channel the op touches, loudly. Never a silently wrong model."""
    reason = f"op '{name}' has no channel rule (in {st.where})"
    touched = [st.get(t) for t in tensors((args, kwargs))]
    for info in touched:
        if info is not None:
            st.freeze(info.ids, reason)
    layouts = {t.dim(): st.get(t).cdim for t in tensors((args, kwargs)) if st.get(t) is not None}
    for t in tensors(out):
        if st.get(t) is None or any(t is a for a in tensors((args, kwargs))):
            st.set_opaque(t, reason, layouts.get(t.dim(), 1))


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
_BINARY = (
    "add sub mul div true_divide floor_divide remainder fmod pow maximum minimum rsub where lerp addcmul addcdiv "
    "eq ne lt le gt ge logical_and logical_or logical_xor and or xor bitwise_and bitwise_or bitwise_xor "
    "masked_fill atan2 hypot copysign copy"
).split()


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


@rule("max_unpool1d", "max_unpool2d", "max_unpool3d")
def max_unpool(st, args, kwargs, out):
    """The indices were made by a max-pool over some producer's channels: those are these channels."""
    x, indices = args[0], _arg(args, kwargs, 1, "indices")
    a, b = st.get(x), st.get(indices)
    if a is None or b is None or a.cdim != b.cdim:
        return unknown(st, "max_unpool with untraced indices", args, kwargs, out)
    st.union(a.ids, b.ids)
    st.set(out, a.ids, a.cdim)


# --- concatenation and splitting ---------------------------------------------------------------------
@rule("cat", "concat", "concatenate")
def cat(st, args, kwargs, out):
    parts = list(_arg(args, kwargs, 0, "tensors"))
    dim = _dim(_arg(args, kwargs, 1, "dim", 0), out.dim())
    infos = [st.get(t) for t in parts]
    traced = [i for i in infos if i is not None]
    if not traced or any(i.cdim != traced[0].cdim for i in traced):
        return unknown(st, "cat of differently laid-out tensors", args, kwargs, out)
    cdim = traced[0].cdim
    if dim == cdim:  # channels line up one after another: no new channel, just offsets
        ids = [i.ids if i is not None else _frozen_part(st, t, cdim) for t, i in zip(parts, infos)]
        return st.set(out, np.concatenate(ids), cdim)
    for t, info in zip(parts, infos):  # along another dim every part carries the same channels
        if info is None:
            _freeze_constants(st, (t,), {}, out, cdim, traced[0])
        elif info is not traced[0]:
            st.union(traced[0].ids, info.ids)
    st.set(out, traced[0].ids, cdim)


def _frozen_part(st, t, cdim):
    ids = st.fresh(t.shape[cdim])
    st.freeze(ids, f"a constant is concatenated onto these channels (in {st.where})")
    return ids


@rule("stack")
def stack(st, args, kwargs, out):
    parts = list(_arg(args, kwargs, 0, "tensors"))
    dim = _dim(_arg(args, kwargs, 1, "dim", 0), out.dim())
    infos = [st.get(t) for t in parts]
    if any(i is None for i in infos) or any(i.cdim != infos[0].cdim for i in infos):
        return unknown(st, "stack of differently laid-out tensors", args, kwargs, out)
    for info in infos[1:]:
        st.union(infos[0].ids, info.ids)
    st.set(out, infos[0].ids, infos[0].cdim + (dim <= infos[0].cdim))


@rule("split", "split_with_sizes", "chunk", "tensor_split", "unbind")
def split(st, args, kwargs, out):
    """Equal chunks along the channels stay equal only if every chunk loses the same channels: the i-th
    channels of all chunks are coupled. Fixed sizes (split, tensor_split) would keep their literal sizes
    after pruning and cut in the wrong place, so those channels are frozen."""
    x, op = args[0], st.current_op
    info = st.get(x)
    if info is None:
        return
    dim = _dim(_arg(args, kwargs, 1 if op == "unbind" else 2, "dim", 0), x.dim())
    parts = list(out)
    if dim != info.cdim:
        for t in parts:
            st.set(t, info.ids, info.cdim - (op == "unbind" and dim < info.cdim))
        return
    if op == "unbind":
        return unknown(st, "unbind along the channels", args, kwargs, out)
    pieces = np.split(info.ids, np.cumsum([t.shape[dim] for t in parts])[:-1])
    equal = all(len(p) == len(pieces[0]) for p in pieces)
    attribute = _size_attribute(st, args, kwargs) if op in ("split", "split_with_sizes") else None
    if attribute is not None and (equal or not isinstance(attribute[1], int)):
        st.bind(st.module_path, f"attr:{attribute[0]}", info.ids)  # surgery rewrites the sizes (plan.py)
    if (op == "chunk" or attribute is not None) and equal and not isinstance(attribute and attribute[1], list):
        for piece in pieces[1:]:  # equal pieces stay equal only if each loses the same channels
            st.union(pieces[0], piece)
    elif attribute is None or (isinstance(attribute[1], int) and not equal):
        _freeze_positional(st, info, op)
    for t, piece in zip(parts, pieces):
        st.set(t, piece, dim)


def _size_attribute(st, args, kwargs):
    """(name, value) of the attribute of the running module that holds the split sizes (res2net's `self.width`,
    mixnet's `self.splits`), when exactly one does: pruning can then rewrite it. None otherwise."""
    size = _arg(args, kwargs, 1, "split_size_or_sections", _arg(args, kwargs, 1, "split_size"))
    module = st.modules.get(st.module_path)
    if module is None or size is None or isinstance(size, torch.Tensor):
        return None
    if isinstance(size, (list, tuple)):
        found = [(n, v) for n, v in vars(module).items() if isinstance(v, (list, tuple)) and list(v) == list(size)]
        found = [(n, list(v)) for n, v in found]
    else:
        found = [(n, v) for n, v in vars(module).items() if type(v) is int and v == size]
    return found[0] if len(found) == 1 else None


def _freeze_positional(st, info, op):
    """Literal channel positions (x[:, 4:8], narrow, index_select) would point elsewhere once channels are
    removed: those channels cannot be cut."""
    st.freeze(info.ids, f"{op} at fixed channel positions (in {st.where})")


# --- indexing -----------------------------------------------------------------------------------------
@rule("getitem")
def getitem(st, args, kwargs, out):
    x, index = args
    info = st.get(x)
    if info is None or not isinstance(out, torch.Tensor):
        return
    index = index if isinstance(index, tuple) else (index,)
    result = _index_channels(index, x.dim(), info)
    if result is None:
        return unknown(st, "indexing that picks single channels or mixes dims", args, kwargs, out)
    ids, cdim = result
    if cdim is None or out.dim() <= cdim or out.shape[cdim] != len(ids):
        return unknown(st, "indexing the channels", args, kwargs, out)
    if len(ids) != len(info.ids) or not np.array_equal(ids, info.ids):
        _freeze_positional(st, info, "indexing")
    st.set(out, ids, cdim)


def _index_channels(index, ndim, info):
    """Walk an index tuple; return (channel elements, channel dim of the result) or None if unsupported."""
    if sum(1 for i in index if i is Ellipsis) > 1:
        return None
    n_used = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded = []
    for item in index:
        expanded.extend([slice(None)] * (ndim - n_used) if item is Ellipsis else [item])
    expanded.extend([slice(None)] * (ndim - sum(1 for i in expanded if i is not None)))
    in_dim, out_dim = 0, 0
    for item in expanded:
        if item is None:
            out_dim += 1
            continue
        if in_dim == info.cdim:
            return _channel_index(item, info.ids, out_dim)
        if isinstance(item, int) and not isinstance(item, bool):  # drops a dim before the channels (kv[0])
            in_dim += 1
            continue
        if not isinstance(item, slice):  # advanced indices before the channels move them
            return None
        out_dim += 1
        in_dim += 1
    return None


def _channel_index(item, ids, out_dim):
    if isinstance(item, slice):
        return ids[item], out_dim
    if isinstance(item, (torch.Tensor, list)):
        sel = torch.as_tensor(item)
        if sel.dim() != 1:
            return None
        return ids[sel.cpu().numpy()], out_dim
    return None  # an int drops the channel dim: the picked channel is used in a way we do not follow


@rule("narrow", "index_select")
def narrow(st, args, kwargs, out):
    x, dim = args[:2]
    info = st.get(x)
    if info is None:
        return
    if _dim(dim, x.dim()) != info.cdim:
        return st.set(out, info.ids, info.cdim)
    if st.current_op == "narrow":
        ids = info.ids[int(args[2]) : int(args[2]) + int(args[3])]
    else:
        ids = info.ids[args[2].cpu().numpy()]
    if len(ids) != len(info.ids) or not np.array_equal(ids, info.ids):
        _freeze_positional(st, info, st.current_op)
    st.set(out, ids, info.cdim)


@rule("select")
def select(st, args, kwargs, out):
    x, dim = args[:2]
    info = st.get(x)
    if info is None:
        return
    dim = _dim(dim, x.dim())
    if dim == info.cdim:
        return unknown(st, "select of one channel", args, kwargs, out)
    st.set(out, info.ids, info.cdim - (dim < info.cdim))


# --- shape ops ----------------------------------------------------------------------------------------
@rule("view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "squeeze", "unsqueeze")
def reshape(st, args, kwargs, out):
    """Row-major reshape: channel c of (.., C, rest..) becomes the k features c*k .. c*k+k-1 of the output
    dim that starts where the channel dim started (flatten into a linear layer)."""
    info = st.get(args[0])
    if info is None or not isinstance(out, torch.Tensor):
        return
    shape, requested = list(args[0].shape), _requested_shape(st.current_op, args, out)
    if _split_heads(st, info, shape, out, requested):
        return
    before, inner = math.prod(shape[: info.cdim]), math.prod(shape[info.cdim + 1 :])
    channels = len(info.ids)
    for j, size in enumerate(out.shape):
        if math.prod(out.shape[:j]) == before and size % channels == 0 and size >= channels:
            k = size // channels
            if inner % k == 0 and math.prod(out.shape[j + 1 :]) == inner // k:
                ids = np.repeat(info.ids, k)
                attribute = _head_attribute(st, size, count=False) if requested and k > 1 else None
                if attribute and requested[j] == size:  # heads merged back to a width held in an attribute
                    st.bind(st.module_path, f"attr:{attribute}", ids)
                return st.set(out, ids, j)
    if not (_merge_groups(st, info, shape, out) or _split_channels(st, info, shape, out)):
        unknown(st, "a reshape that splits or merges the channels with other dims", args, kwargs, out)


def _requested_shape(op, args, out) -> list | None:
    """The shape a view/reshape asked for, with its -1 (None for the other shape ops)."""
    if op not in ("view", "reshape") or len(args) < 2:
        return None
    shape = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    if len(shape) != out.dim() or not all(isinstance(s, int) for s in shape):
        return None
    return list(shape)


def _split_heads(st, info, shape, out, requested) -> bool:
    """(.., C, rest..) -> (.., h, d, rest..) into attention heads: channels h*d.. of head h are one element, so
    whole heads are cut and the head size d stays (exact for any attention: no scale changes). Chosen when the
    head count is inferred (-1, transformers' `view(*shape, -1, head_dim)`) or held in a `*head*` attribute beside
    the head size (then rewritten, like `num_heads`); otherwise the split is per feature (see _split_channels)."""
    if requested is None:
        return False
    before, inner = math.prod(shape[: info.cdim]), math.prod(shape[info.cdim + 1 :])
    for j in range(out.dim() - 1):
        h, d = out.shape[j], out.shape[j + 1]
        if math.prod(out.shape[:j]) != before or h * d != len(info.ids) or math.prod(out.shape[j + 2 :]) != inner:
            continue
        inferred = requested[j] == -1 and requested[j + 1] != -1
        attribute = None if inferred else _head_attribute(st, h, count=True)
        if not (inferred or (h > 1 and attribute and _has_int_attribute(st, requested[j + 1]))):
            return False
        if h == 1:  # one head: its features are cut instead, with the head size's attribute rewritten
            return _one_head(st, info, out, j, requested[j + 1])
        heads = info.ids.reshape(h, d)
        for head in heads:
            st.union_all(head)
        if attribute:
            st.bind(st.module_path, f"attr:{attribute}", heads[:, 0])
        st.set(out, heads[:, 0], j)
        return True
    return False


def _one_head(st, info, out, j, size) -> bool:
    """A single head of fixed size `size` (transformers' SegFormer stage 1: `view(.., -1, head_dim)`): a cut feature
    would break the view unless the attribute holding the size (`head_dim`) is rewritten; q, k and v bind it, so
    they lose the same features. Without such an attribute the features are frozen."""
    attribute = _head_attribute(st, size, count=False)
    if attribute:
        st.bind(st.module_path, f"attr:{attribute}", info.ids)
    else:
        st.freeze(info.ids, f"the only attention head, of fixed size {size} (in {st.where})")
    st.set(out, info.ids, j + 1)
    return True


def _int_attributes(st) -> list[tuple[str, int]]:
    module = st.modules.get(st.module_path)
    return [] if module is None else [(n, v) for n, v in vars(module).items() if type(v) is int]


def _has_int_attribute(st, value: int) -> bool:
    return any(v == value for _, v in _int_attributes(st))


def _head_attribute(st, value: int, count: bool) -> str | None:
    """The running module's one `*head*` int attribute equal to `value`: a head count (`num_heads`,
    `num_attention_heads`) when `count`, else a width (`all_head_size`). Surgery rewrites it (plan.py)."""
    found = [n for n, v in _int_attributes(st) if v == value and "head" in n.lower()
             and count == ("num" in n.lower() or n.lower() in ("heads", "nhead", "n_head", "n_heads"))]
    return found[0] if len(found) == 1 else None


def _merge_groups(st, info, shape, out) -> bool:
    """(.., G, k, rest..) with channels on k -> (.., G*k, rest..): the inverse of _split_channels (heads split per
    feature, merged back): output channel g*k+i is feature i."""
    if info.cdim == 0:
        return False
    g, outer = shape[info.cdim - 1], math.prod(shape[: info.cdim - 1])
    inner = math.prod(shape[info.cdim + 1 :])
    for j in range(out.dim()):
        if math.prod(out.shape[:j]) == outer and out.shape[j] == g * len(info.ids) and \
                math.prod(out.shape[j + 1 :]) == inner:
            st.set(out, np.tile(info.ids, g), j)
            return True
    return False


def _split_channels(st, info, shape, out) -> bool:
    """(.., G*k, rest..) -> (.. G .., k, rest..): channel g*k+i becomes feature i of group g, the groups joining the
    outer dims (a detection head's per-anchor outputs, (N, A*k, H, W) -> permute -> (N, H*W*A, k)). Feature i then
    stands for the G channels {g*k+i}: they are one channel, cut together, so the output keeps k features."""
    before, inner = math.prod(shape[: info.cdim]), math.prod(shape[info.cdim + 1 :])
    channels = len(info.ids)
    for j in range(out.dim()):
        outer = math.prod(out.shape[:j])
        if outer <= before or outer % before or channels % (outer // before):
            continue
        groups = outer // before
        k = channels // groups
        if k > 1 and out.shape[j] == k and math.prod(out.shape[j + 1 :]) == inner:
            ids = info.ids.reshape(groups, k)
            for g in range(1, groups):
                st.union(ids[0], ids[g])
            st.set(out, ids[0], j)
            return True
    return False


@rule("pixel_unshuffle", "unfold")
def spread(st, args, kwargs, out):
    """Channel c becomes k consecutive channels c*k .. c*k+k-1 (pixel_unshuffle: k = r², unfold / im2col: one per
    kernel position, zero padding): a removed channel is zero in all of them."""
    info = st.get(args[0])
    if info is None or info.cdim != 1 or out.shape[1] % len(info.ids):
        return unknown(st, f"{st.current_op} of a tensor whose channels are not dim 1", args, kwargs, out)
    st.set(out, np.repeat(info.ids, out.shape[1] // len(info.ids)), 1)


@rule("pixel_shuffle", "fold")
def gather(st, args, kwargs, out):
    """Channels c*k .. c*k+k-1 become channel c (pixel_shuffle: k = r², sub-pixel upsampling; fold / col2im: the
    kernel positions summed back): they are one channel, removed together."""
    info = st.get(args[0])
    if info is None or info.cdim != 1 or len(info.ids) % out.shape[1]:
        return unknown(st, f"{st.current_op} of a tensor whose channels are not dim 1", args, kwargs, out)
    blocks = info.ids.reshape(out.shape[1], -1)
    for block in blocks:
        st.union_all(block)
    st.set(out, blocks[:, 0], 1)


@rule("permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t")
def permute(st, args, kwargs, out):
    x = args[0]
    info = st.get(x)
    if info is None:
        return
    order = _permutation(st.current_op, args, kwargs, x.dim())
    st.set(out, info.ids, order.index(info.cdim))


def _permutation(op, args, kwargs, ndim):
    dims = list(range(ndim))
    if op == "permute":
        given = args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else args[1]
        return [_dim(d, ndim) for d in given]
    if op == "t":
        return dims[::-1]
    a, b = (_dim(d, ndim) for d in args[1:3])
    if op in ("movedim", "moveaxis"):
        dims.remove(a)
        dims.insert(b, a)
    else:
        dims[a], dims[b] = dims[b], dims[a]
    return dims


@rule("expand", "expand_as", "broadcast_to", "repeat")
def expand(st, args, kwargs, out):
    x = args[0]
    info = st.get(x)
    if info is None:
        return
    cdim = info.cdim + out.dim() - x.dim()
    size, channels = out.shape[cdim], len(info.ids)
    if size == channels:
        return st.set(out, info.ids, cdim)
    if channels == 1:  # one channel broadcast onto many: those are nobody's channels
        return st.set_free(out, cdim)
    st.set(out, np.tile(info.ids, size // channels), cdim)  # repeat: the same channels again


# --- reductions ---------------------------------------------------------------------------------------
@rule("sum", "mean", "amax", "amin", "std", "var", "norm", "prod", "logsumexp", "nansum", "nanmean", "median",
      "max", "min", "argmax", "argmin", "all", "any")
def reduce(st, args, kwargs, out):
    x = args[0]
    info = st.get(x)
    if info is None:
        return
    if st.current_op in ("max", "min") and isinstance(_arg(args, kwargs, 1, "other"), torch.Tensor):
        return elementwise(st, args, kwargs, out)
    dims = _arg(args, kwargs, 1, "dim")
    if st.current_op == "norm":
        dims = _arg(args, kwargs, 2, "dim")
    dims = list(range(x.dim())) if dims is None else [dims] if isinstance(dims, int) else list(dims)
    dims = [_dim(d, x.dim()) for d in dims]
    if info.cdim in dims:  # every channel feeds the result: removing one would change it
        st.freeze(info.ids, f"{st.current_op} over the channels (in {st.where})")
        for t in tensors(out):
            st.set_opaque(t, "a reduction over channels")
        return
    keepdim = bool(_arg(args, kwargs, 3 if st.current_op == "norm" else 2, "keepdim", False))
    cdim = info.cdim if keepdim else info.cdim - sum(d < info.cdim for d in dims)
    for t in tensors(out):
        st.set(t, info.ids, cdim)


@rule("softmax", "log_softmax", "softmin", "cumsum", "cumprod", "normalize")
def along_dim(st, args, kwargs, out):
    x = args[0]
    info = st.get(x)
    if info is None:
        return
    dim = _arg(args, kwargs, 1, "dim", 1 if st.current_op == "normalize" else None)
    if st.current_op == "normalize":
        dim = _arg(args, kwargs, 2, "dim", 1)
    if dim is None or _dim(dim, x.dim()) == info.cdim:
        st.freeze(info.ids, f"{st.current_op} across the channels (in {st.where})")
        return st.set_opaque(out, "mixes channels")
    st.set(out, info.ids, info.cdim)


# --- ops that make tensors from nothing traced --------------------------------------------------------
@rule("zeros", "ones", "empty", "full", "arange", "linspace", "rand", "randn", "randint", "tensor", "as_tensor",
      "eye", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "size", "dim", "numel", "item",
      "tolist", "get", "shape", "is_contiguous", "stride", "data_ptr", "element_size", "len", "bool", "float_",
      "int", "index", "format", "repr", "hash", "is_floating_point", "is_complex", "nonzero_static")
def constant(st, args, kwargs, out):
    """Outputs carry no traced channels; a later elementwise op freezes whatever they would need."""


@rule("setitem")
def setitem(st, args, kwargs, out):
    for t in tensors(args):
        info = st.get(t)
        if info is not None:
            st.freeze(info.ids, f"in-place write into a slice (in {st.where})")


# --- contractions: einsum, matmul, bmm ------------------------------------------------------------------------
# A channel contracted between two traced operands (YOLACT's masks: prototypes (N, k, H, W) times coefficients
# (N, A, k)) is one channel in both: a dead factor kills the product term, so both sides lose it together and the
# output carries none of it. A channel summed inside one operand alone, or meeting a tensor that is not traced (a
# constant keeps its k values), is frozen; a channel meeting another operand's non-channel dim is an unknown op.
@rule("einsum")
def einsum(st, args, kwargs, out):
    equation, operands = args[0], list(args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    parsed = _parse_einsum(equation, operands)
    if parsed is None or not isinstance(out, torch.Tensor):
        return unknown(st, f"einsum '{equation}' (ellipsis or an unparsed equation)", args, kwargs, out)
    _contract(st, *parsed, operands, args, kwargs, out)


def _parse_einsum(equation, operands):
    eq = equation.replace(" ", "")
    if "." in eq or not all(isinstance(t, torch.Tensor) for t in operands):
        return None
    lhs, arrow, rhs = eq.partition("->")
    subs = lhs.split(",")
    if not arrow:  # implicit output: the letters used once, in alphabetical order
        rhs = "".join(sorted(c for c in set(lhs) if c != "," and lhs.count(c) == 1))
    if len(subs) != len(operands) or any(len(s) != t.dim() for s, t in zip(subs, operands)):
        return None
    return subs, rhs


_BATCH_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVW"  # never k, x, y


@rule("matmul", "mm", "bmm", "rmatmul")
def matmul(st, args, kwargs, out):
    second = "mat2" if st.current_op in ("mm", "bmm") else "other"
    a, b = (args[1], args[0]) if st.current_op == "rmatmul" else (args[0], _arg(args, kwargs, 1, second))
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or not isinstance(out, torch.Tensor):
        return unknown(st, f"{st.current_op} of non-tensors", args, kwargs, out)
    subs, rhs = _matmul_subscripts(a.dim(), b.dim())
    _contract(st, subs, rhs, [a, b], args, kwargs, out)


def _matmul_subscripts(da: int, db: int) -> tuple[list[str], str]:
    """torch.matmul as an einsum: 1-D operands gain and lose a dim, batch dims broadcast right-aligned."""
    batch = _BATCH_LETTERS[: max(da, db, 2) - 2]
    sa = "k" if da == 1 else batch[len(batch) - (da - 2) :] + "xk"
    sb = "k" if db == 1 else batch[len(batch) - (db - 2) :] + "ky"
    rhs = batch + ("x" if da > 1 else "") + ("y" if db > 1 else "")
    return [sa, sb], rhs


def _contract(st, subs, rhs, operands, args, kwargs, out):
    channels = {}  # channel letter -> the channels it carries
    for s, t in zip(subs, operands):
        info = st.get(t)
        if info is None or st.is_free(info):  # channels tied to nothing act as a constant here
            continue
        letter = s[info.cdim]
        if not _operand_fits(st, letter, info, subs, operands, rhs):
            return unknown(st, f"{st.current_op} of channels with a repeated subscript or another operand's "
                               "non-channel dim", args, kwargs, out)
        if letter in channels:
            st.union(channels[letter].ids, info.ids)
        channels.setdefault(letter, info)
    kept = [letter for letter in channels if letter in rhs]
    if len(kept) > 1:
        return unknown(st, f"{st.current_op} whose output carries two channel spaces", args, kwargs, out)
    if kept:
        return st.set(out, channels[kept[0]].ids, rhs.index(kept[0]))
    if out.dim() >= 1:  # every channel was contracted away: the output's dims belong to nobody
        st.set_free(out, 1 if out.dim() >= 2 else 0)


def _operand_fits(st, letter, info, subs, operands, rhs) -> bool:
    """Check where a traced operand's channel letter occurs elsewhere, freezing what cannot be cut; False when
    it meets a non-channel dim (the op is then unknown)."""
    if any(s.count(letter) > 1 for s in subs):
        return False
    traced = 0
    for s, t in zip(subs, operands):
        if letter not in s:
            continue
        other, size = st.get(t), t.shape[s.index(letter)]
        other = None if other is None or st.is_free(other) else other
        if other is None and size > 1:
            st.freeze(info.ids, f"{st.current_op} meets these channels with a tensor that is not traced ({st.where})")
        elif other is not None and (s[other.cdim] != letter or size != len(info.ids)):
            return False
        traced += other is not None
    if letter not in rhs and traced < 2:
        st.freeze(info.ids, f"{st.current_op} sums over these channels (in {st.where})")
    return True


# --- attention -----------------------------------------------------------------------------------------------
@rule("scaled_dot_product_attention")
def attention(st, args, kwargs, out):
    """softmax(q kᵀ · scale + mask) v on (.., L, E), (.., S, E), (.., S, Ev). Heads (a batch dim, see _split_heads)
    are one channel in q, k, v and the output: a removed head is zero in v, so zero out. Feature dims: q's and
    k's are contracted together (exact only with an explicit `scale`: the default 1/sqrt(E) changes with E, so
    they are frozen), v's pass to the output."""
    q, k, v = (_arg(args, kwargs, i, name) for i, name in enumerate(("query", "key", "value")))
    mask, gqa = _arg(args, kwargs, 3, "attn_mask"), _arg(args, kwargs, 7, "enable_gqa", False)
    nd = out.dim() if isinstance(out, torch.Tensor) else 0
    infos = [st.get(t) for t in (q, k, v)]
    if st.get(mask) is not None or gqa or nd < 3 or any(t.dim() != nd for t in (q, k, v)):
        return unknown(st, "scaled_dot_product_attention with a traced mask, grouped queries or broadcast "
                           "batch dims", args, kwargs, out)
    traced = [i for i in infos if i is not None]
    if any(i.cdim < nd - 2 for i in traced):  # heads
        if len(traced) < 3 or len({(i.cdim, len(i.ids)) for i in traced}) != 1:
            return unknown(st, "attention whose q, k and v do not carry the same heads", args, kwargs, out)
        st.union(traced[0].ids, traced[1].ids)
        st.union(traced[0].ids, traced[2].ids)
        return st.set(out, traced[0].ids, traced[0].cdim)
    if any(i.cdim == nd - 2 for i in traced):
        return unknown(st, "attention with channels on the sequence dim", args, kwargs, out)
    iq, ik, iv = infos
    if iq is not None or ik is not None:
        if iq is None or ik is None:
            st.freeze((iq or ik).ids, f"attention meets these query/key features with an untraced tensor "
                                      f"(in {st.where})")
        else:
            st.union(iq.ids, ik.ids)
            if _arg(args, kwargs, 6, "scale") is None:
                st.freeze(iq.ids, f"scaled_dot_product_attention's default scale 1/sqrt(E) changes when query/key "
                                  f"features are cut (in {st.where}; pass scale= to prune them)")
    if iv is not None:
        st.set(out, iv.ids, nd - 1)
    else:
        st.set_free(out, nd - 1)
