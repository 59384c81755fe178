"""Shape ops: max_unpool (indices), cat/stack/split, indexing, view/reshape/flatten (heads: attention.py),
pixel_(un)shuffle, (un)fold, permute, expand, in-place slice writes."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

from segprune._utils import tensors
from segprune.prune.rules.attention import _is_int, _split_heads, _width_attribute
from segprune.prune.rules.base import _arg, _dim, rule, unknown
from segprune.prune.rules.elementwise import _freeze_constants
from segprune.prune.sizes import Size


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
        found = [(n, v) for n, v in vars(module).items() if _is_int(v) and v == size]
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
    dim that starts where the channel dim started (flatten into a linear layer). Sizes the code computed from
    widths are then followed (_follow_sizes)."""
    info = st.get(args[0])
    if info is None or not isinstance(out, torch.Tensor):
        return
    shape, requested = list(args[0].shape), _requested_shape(st.current_op, args, out)
    if _channel_layout(st, info, shape, out, requested, args, kwargs) and requested:
        _follow_sizes(st, info, shape, out, requested)


def _channel_layout(st, info, shape, out, requested, args, kwargs) -> bool:
    """Say which output elements the channels become; False when the op is unknown."""
    if _split_heads(st, info, shape, out, requested):
        return True
    before, inner = math.prod(shape[: info.cdim]), math.prod(shape[info.cdim + 1 :])
    channels = len(info.ids)
    for j, size in enumerate(out.shape):
        if math.prod(out.shape[:j]) == before and size % channels == 0 and size >= channels:
            k = size // channels
            if inner % k == 0 and math.prod(out.shape[j + 1 :]) == inner // k:
                ids = np.repeat(info.ids, k)
                owner = _width_attribute(st, requested[j]) if requested and k > 1 else None
                if owner and requested[j] == size:  # heads merged back to a width held in an attribute
                    st.bind(owner[0], f"attr:{owner[1]}", ids)
                st.set(out, ids, j)
                return True
    if _merge_groups(st, info, shape, out) or _split_channels(st, info, shape, out):
        return True
    unknown(st, "a reshape that splits or merges the channels with other dims", args, kwargs, out)
    return False


def _follow_sizes(st, info, shape, out, requested) -> None:
    """A requested size computed from a traced tensor's width (a Size with `ids`, sizes.py) is computed from the
    pruned width in the pruned model: the dims it sizes must shrink with that width. Over the output dims that
    carry the channels, the requested sizes multiply to `len(ids) * c` (attribute powers cancelling, as in
    `self.num_heads * (C // self.num_heads)`): those `c * len(ids)` output positions are tied to the width's
    channels, c of them (or 1/c) per channel, so both lose the same count. A width sizing any other dim, or a
    product that keeps an attribute, cannot be followed: frozen, saying where."""
    widths = [(i, r) for i, r in enumerate(requested) if isinstance(r, Size) and r.ids is not None]
    if not widths:  # nearly every reshape: nothing to follow
        return
    oinfo = st.get(out)
    lo, hi = _channel_span(info.cdim, shape, oinfo.cdim, list(out.shape))
    where = f"reshape to {[int(r) for r in requested]} in {st.where}"
    if len(widths) > 1 or not lo <= widths[0][0] < hi:
        for _, r in widths:
            st.freeze(np.concatenate([r.ids, info.ids]), f"a size computed from a width shapes another dim ({where})")
        return
    width, scale, attrs = widths[0][1], Fraction(1), {}
    for r in requested[lo:hi]:
        scale *= r.scale if isinstance(r, Size) else Fraction(int(r))
        for key, p in (r.attrs.items() if isinstance(r, Size) else ()):
            attrs[key] = attrs.get(key, 0) + p
    kept = [f"{m}.{a}" if m else a for (m, a), p in attrs.items() if p]
    positions = np.broadcast_to(np.expand_dims(oinfo.ids, tuple(range(oinfo.cdim - lo)) + tuple(
        range(oinfo.cdim - lo + 1, hi - lo))), out.shape[lo:hi]).reshape(-1)
    if kept or len(positions) != len(width.ids) * scale:
        return st.freeze(np.concatenate([width.ids, info.ids]), f"a size computed from a width times "
                         f"{', '.join(kept) or 'a ratio'} that pruning would change ({where})")
    _tie_counts(st, positions, width.ids, scale, where)


def _channel_span(cdim_in, shape_in, cdim_out, shape_out) -> tuple[int, int]:
    """The output dims [lo, hi) that hold what the input's channel dim and the dims it merges with hold: between
    the last boundary both shapes share before the channels and the first one after."""
    cum_in, cum_out = np.cumprod([1, *shape_in]), np.cumprod([1, *shape_out])
    common = set(cum_in.tolist()) & set(cum_out.tolist())
    start = min(cum_in[cdim_in], cum_out[cdim_out])
    stop = max(cum_in[cdim_in + 1], cum_out[cdim_out + 1])
    first = max(c for c in common if c <= start)
    last = min(c for c in common if c >= stop)
    lo = min(i for i in range(len(shape_out) + 1) if cum_out[i] == first)  # size-1 dims (one head) included
    hi = max(i for i in range(len(shape_out) + 1) if cum_out[i] == last)
    return lo, hi


def _tie_counts(st, positions, ids, scale, where) -> None:
    """Prune `positions` and the width's `ids` in step, `scale` positions per width channel. Walking both in order,
    channels (with how many positions each fills, times `scale` for the width's) are gathered until the two sides
    weigh the same, and each such block is made one channel: whole heads pair with as many width channels as their
    positions need, and nothing is coupled that the counts do not require."""
    pos, src = _weights(st, positions, 1), _weights(st, ids, scale)
    if sorted(pos.items()) == sorted(src.items()):
        return  # the same channels: their counts already agree
    if any(e in st.frozen for e in ids.tolist()):
        return st.freeze(positions, f"their count is computed from the width of channels that are frozen ({where})")
    a, b, block, balance = list(pos.items()), list(src.items()), [], Fraction(0)
    while a or b:
        side = a if (balance <= 0 and a) or not b else b
        root, weight = side.pop(0)
        block.append(root)
        balance += weight if side is a else -weight
        if balance == 0:
            st.union_all(np.array(block))
            block = []
    if block:
        st.freeze(np.concatenate([positions, ids]), f"a size {scale} times a width that channels cannot match "
                                                    f"({where})")


def _weights(st, ids, scale) -> dict[int, Fraction]:
    """Each channel of `ids` (by root, in order of first position) and the positions it fills, times `scale`."""
    weights = {}
    for e in ids.tolist():
        root = st.find(e)
        weights[root] = weights.get(root, 0) + Fraction(scale)
    return weights


def _requested_shape(op, args, out) -> list | None:
    """The shape a view/reshape asked for, with its -1 (None for the other shape ops)."""
    if op not in ("view", "reshape") or len(args) < 2:
        return None
    shape = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    if len(shape) != out.dim() or not all(isinstance(s, int) for s in shape):
        return None
    return list(shape)


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
    if (info is None or st.is_free(info)) and _repeated_count(st, args, out):
        return
    if info is None:
        return
    cdim = info.cdim + out.dim() - x.dim()
    size, channels = out.shape[cdim], len(info.ids)
    if size == channels:
        return st.set(out, info.ids, cdim)
    if channels == 1:  # one channel broadcast onto many: those are nobody's channels
        return st.set_free(out, cdim)
    st.set(out, np.tile(info.ids, size // channels), cdim)  # repeat: the same channels again


def _repeated_count(st, args, out) -> bool:
    """`mask.unsqueeze(1).repeat(1, self.num_heads, 1, 1)` (Mask2Former's per-head attention mask): a size-1 dim
    copied a module attribute's count of times holds one identical slice per head. Its positions become channels
    bound to that attribute, so that attention ties them to the heads and the pruned model repeats as many times as
    heads are kept (the slices being copies, which heads does not matter)."""
    x = args[0]
    counts = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    if not isinstance(out, torch.Tensor) or len(counts) != out.dim():
        return False
    lead = out.dim() - x.dim()
    for j, count in enumerate(counts):
        owner = count.attribute if isinstance(count, Size) else None
        if owner and out.shape[j] > 1 and (j < lead or x.shape[j - lead] == 1):
            ids = st.fresh(out.shape[j])
            st.bind(owner[0], f"attr:{owner[1]}", ids)
            st.set(out, ids, j)
            return True
    return False


@rule("setitem")
def setitem(st, args, kwargs, out):
    for t in tensors(args):
        info = st.get(t)
        if info is not None:
            st.freeze(info.ids, f"in-place write into a slice (in {st.where})")
