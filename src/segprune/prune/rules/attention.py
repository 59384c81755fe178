"""Attention: heads split off the channels by a view (whole heads cut, head-count attributes rewritten),
contractions (einsum, matmul, bmm) and scaled_dot_product_attention."""

from __future__ import annotations

import math

import torch

from segprune.prune.rules.base import _arg, rule, unknown
from segprune.prune.sizes import Size


# --- heads: a view that splits the channels into (heads, head size); used by shapes.reshape ----------------
def _split_heads(st, info, shape, out, requested) -> bool:
    """(.., C, rest..) -> (.., [g,] h, d, rest..) into attention heads: channels h*d.. of head h are one element, so
    whole heads are cut and the head size d stays (exact for any attention: no scale changes). Chosen when the
    head count is inferred (-1, transformers' `view(*shape, -1, head_dim)`) or read from a module attribute (then
    rewritten: timm's `num_heads`, or any name, sizes.py) beside a head size that is an attribute or computed from
    a width (`C // self.num_heads`); otherwise the split is per feature (see _split_channels). A leading literal g
    (timm's fused qkv: `reshape(B, N, 3, self.num_heads, self.head_dim)`) makes g tensors with the same heads: head
    i of each is cut with head i of the others, as attention needs anyway."""
    if requested is None:
        return False
    before, inner = math.prod(shape[: info.cdim]), math.prod(shape[info.cdim + 1 :])
    starts = [a for a in range(out.dim()) if math.prod(out.shape[:a]) == before]
    for a in starts:
        for j in range(a, out.dim() - 1):
            g, h, d = math.prod(out.shape[a:j]), out.shape[j], out.shape[j + 1]
            if g * h * d != len(info.ids) or math.prod(out.shape[j + 2 :]) != inner:
                continue
            if any(r == -1 or isinstance(r, Size) for r in requested[a:j]):
                return False
            return _heads(st, info, out, requested, j, g)
    return False


def _heads(st, info, out, requested, j, g) -> bool:
    h, d = out.shape[j], out.shape[j + 1]
    inferred = requested[j] == -1 and requested[j + 1] != -1
    owner = None if inferred else _count_attribute(st, requested[j])
    tied = isinstance(requested[j + 1], Size) or _has_int_attribute(st, requested[j + 1])
    read = isinstance(requested[j], Size) and requested[j].attribute is not None  # a count read, not guessed
    if not (inferred or ((h > 1 or read) and owner and tied)):
        return False
    if h == 1:  # one head: its features are cut instead, with the head size's attribute rewritten
        return _one_head(st, info, out, j, requested[j + 1], g)
    heads = info.ids.reshape(g, h, d)
    for head in heads.reshape(g * h, d):
        st.union_all(head)
    for k in range(1, g):
        st.union(heads[0, :, 0], heads[k, :, 0])
    if owner:
        st.bind(owner[0], f"attr:{owner[1]}", heads[0, :, 0])
    st.set(out, heads[0, :, 0], j)
    return True


def _count_attribute(st, value) -> tuple[str, str] | None:
    """(module, attribute) holding a head count: the attribute the value was read from, or the running module's one
    `*head*` count attribute equal to it."""
    return _attribute_of(st, value, count=True)


def _width_attribute(st, value) -> tuple[str, str] | None:
    """(module, attribute) holding a width (a head size, `all_head_size`, timm's `attn_dim`), as _count_attribute."""
    return _attribute_of(st, value, count=False)


def _attribute_of(st, value, count: bool) -> tuple[str, str] | None:
    if isinstance(value, Size) and value.attribute:
        return value.attribute
    name = _head_attribute(st, value, count=count)
    return (st.module_path, name) if name else None


def _one_head(st, info, out, j, size, g=1) -> bool:
    """A single head of fixed size `size` (transformers' SegFormer stage 1: `view(.., -1, head_dim)`): a cut feature
    would break the view unless the attribute holding the size (`head_dim`) is rewritten; q, k and v bind it, so
    they lose the same features (feature i of each of g fused parts together). A size computed from a width
    (`C // self.num_heads`) follows that width instead (shapes._follow_sizes). Otherwise the features are frozen."""
    parts = info.ids.reshape(g, -1)
    for k in range(1, g):
        st.union(parts[0], parts[k])
    owner = _width_attribute(st, size)
    if owner:
        st.bind(owner[0], f"attr:{owner[1]}", parts[0])
    elif not (isinstance(size, Size) and size.ids is not None):
        st.freeze(info.ids, f"the only attention head, of fixed size {size} (in {st.where})")
    st.set(out, parts[0], j + 1)
    return True


def _int_attributes(st) -> list[tuple[str, int]]:
    module = st.modules.get(st.module_path)
    return [] if module is None else [(n, v) for n, v in vars(module).items() if _is_int(v)]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _has_int_attribute(st, value: int) -> bool:
    return any(v == value for _, v in _int_attributes(st))


def _head_attribute(st, value: int, count: bool) -> str | None:
    """The running module's one `*head*` int attribute equal to `value`: a head count (`num_heads`,
    `num_attention_heads`) when `count`, else a width (`all_head_size`). Surgery rewrites it (plan.py)."""
    found = [n for n, v in _int_attributes(st) if v == value and "head" in n.lower()
             and count == ("num" in n.lower() or n.lower() in ("heads", "nhead", "n_head", "n_heads"))]
    return found[0] if len(found) == 1 else None


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
def _per_head_mask(st, mask, heads, nd) -> None:
    """An untraced mask with one slice per head (Swin's relative-position bias, gathered from a raw table) keeps
    every head's slice after a cut: the heads freeze, announced here rather than found by verification."""
    if not isinstance(mask, torch.Tensor) or mask.dim() < nd - heads.cdim:
        return
    if mask.shape[heads.cdim - nd] > 1:
        st.freeze(heads.ids, f"scaled_dot_product_attention's mask has one slice per head (a relative-position bias "
                             f"or another per-head constant, shape {tuple(mask.shape)}), which the trace does not "
                             f"cut (in {st.where})")


def _mask_on_heads(st, mask, minfo, heads, nd) -> bool:
    """A mask whose traced dim is the heads (one slice per head, repeated from the head count: Mask2Former's masked
    cross-attention) is cut with them."""
    if minfo.cdim + nd - mask.dim() != heads.cdim or len(minfo.ids) != len(heads.ids):
        return False
    st.union(heads.ids, minfo.ids)
    return True


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
    minfo = st.get(mask)
    minfo = None if minfo is None or st.is_free(minfo) else minfo  # a mask tied to nothing acts as a constant
    if gqa or nd < 3 or any(t.dim() != nd for t in (q, k, v)):
        return unknown(st, "scaled_dot_product_attention with grouped queries or broadcast batch dims", args, kwargs,
                       out)
    traced = [i for i in infos if i is not None]
    if any(i.cdim < nd - 2 for i in traced):  # heads
        if len(traced) < 3 or len({(i.cdim, len(i.ids)) for i in traced}) != 1:
            return unknown(st, "attention whose q, k and v do not carry the same heads", args, kwargs, out)
        st.union(traced[0].ids, traced[1].ids)
        st.union(traced[0].ids, traced[2].ids)
        if minfo is not None and not _mask_on_heads(st, mask, minfo, traced[0], nd):
            return unknown(st, "scaled_dot_product_attention with a mask traced on another dim than the heads",
                           args, kwargs, out)
        if minfo is None:
            _per_head_mask(st, mask, traced[0], nd)
        return st.set(out, traced[0].ids, traced[0].cdim)
    if minfo is not None:
        return unknown(st, "scaled_dot_product_attention with a traced mask", args, kwargs, out)
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
