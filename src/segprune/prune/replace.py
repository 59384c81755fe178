"""Module replacement: a module the engine cannot cut in place is swapped, before the trace, for an equivalent one
it can, and the plan records the swap so that `Plan.apply` replays it on a freshly built model.

`nn.MultiheadAttention` is the built-in case: PyTorch computes it in one fused op whose inner width must equal the
embedding width, so nothing in it can be cut. :class:`SplitMultiheadAttention` computes the same thing with plain
q/k/v/out `Linear` layers, a view into `self.num_heads` heads of `self.head_dim` and
`scaled_dot_product_attention`: whole heads are then cut (the attribute rewritten), the embedding width is cut
independently of the heads, and no hand-written head dict is needed. Each swap is checked on the example inputs
(the model's outputs before and after; on a crop of them, as verification does, unless the model needs their size)
and undone, with a warning, when they differ.

Register another with ``register_replacement(ModuleType, build, name=...)``: `build(module)` returns the
equivalent module (weights copied) or None when this instance is not covered.

Opt-in: weight-standardised convolutions (timm's `StdConv2d`, `ScaledStdConv2d`: BiT, NF-nets) standardise each
filter over its inputs on every call, so cutting an input channel changes every filter's mean and variance, and
the engine freezes their inputs. ``prune(allow_approximate=("weight_standardization",))`` swaps each for a plain
`nn.Conv2d` holding the standardised weight, baked once (the outputs are the same; the swap is checked like every
other); the convs then prune exactly. It is opt-in because what changes is training: fine-tuning a plain conv no
longer standardises its weight. The plan records the swap, so replay and checkpoints stay exact.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from segprune._utils import tensors


@dataclass(frozen=True)
class Replacement:
    kind: type | str  # a class, or its qualified name (a library segprune does not import)
    build: Callable[[nn.Module], nn.Module | None]
    opt_in: str = ""  # "": always; else only when prune's allow_approximate names it
    fresh: bool = False  # build's module holds none of its argument's tensors or modules: it needs no copy first

    def covers(self, module: nn.Module) -> bool:
        if isinstance(self.kind, str):
            return f"{type(module).__module__}.{type(module).__qualname__}" == self.kind
        return isinstance(module, self.kind)


REPLACEMENTS: dict[str, Replacement] = {}


def register_replacement(kind: type | str, build: Callable[[nn.Module], nn.Module | None], *,
                         name: str | None = None, opt_in: str = "", fresh: bool = False):
    """Swap every `kind` module (a class, or a class's qualified name) for `build(module)` before pruning; `name`
    is what plans record (default: the class's qualified name); with `opt_in`, only when `prune`'s
    `allow_approximate` names it; `fresh` says that `build` copies what it keeps (then the model's copy skips the
    module, whose weights may be most of the model's)."""
    key = name or (kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}")
    REPLACEMENTS[key] = Replacement(kind, build, opt_in, fresh)


def replace_module(model: nn.Module, name: str, key: str) -> None:
    """Swap submodule `name` for its replacement `key` (Plan.apply); ValueError when it does not fit."""
    if key not in REPLACEMENTS:
        raise ValueError(f"plan replaces {name!r} with {key!r}, which is not registered (register_replacement)")
    try:
        module = model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"plan replaces layer {name!r}, which this model does not have") from err
    new = REPLACEMENTS[key].build(module) if REPLACEMENTS[key].covers(module) else None
    if new is None:
        raise ValueError(f"plan replaces {name!r} ({type(module).__name__}) with {key!r}, which does not cover it")
    _set(model, name, new)


def replaced(model: nn.Module, call: Callable, allow: Sequence[str] = ()) -> tuple[nn.Module, dict[str, str]]:
    """`model` with every registered module swapped (a copy, unless there is nothing to swap), and {name: key} of
    the swaps that kept the outputs of `call(model)` (the model run on the example inputs); opt-in replacements
    only when `allow` names them."""
    found = [(name, key, m) for name, m in model.named_modules() if name
             for key, r in REPLACEMENTS.items() if r.covers(m) and (not r.opt_in or r.opt_in in allow)]
    if not found:
        return model, {}
    reference = _outputs(model, call)
    fresh = {id(m): (name, key, swap) for name, key, m in found
             if REPLACEMENTS[key].fresh and (swap := REPLACEMENTS[key].build(m)) is not None}
    new = copy.deepcopy(model, {i: swap for i, (_, _, swap) in fresh.items()})  # the fresh swaps go in uncopied
    swaps = [*fresh.values()] + [(name, key, swap) for name, key, m in found if id(m) not in fresh
                                 and (swap := REPLACEMENTS[key].build(new.get_submodule(name))) is not None]
    for name, _, swap in swaps:
        _set(new, name, swap)
    if _check(new, reference, call) is True:  # one forward pass for all swaps, the usual case
        return new, {name: key for name, key, _ in swaps}
    new, done = copy.deepcopy(model), {}
    for name, key, _ in swaps:  # find the swaps that change the outputs, one at a time
        module = new.get_submodule(name)
        swap = REPLACEMENTS[key].build(copy.deepcopy(module))
        _set(new, name, swap)
        same = _check(new, reference, call)
        if same is True:
            done[name] = key
        else:
            _set(new, name, module)
            warnings.warn(f"segprune: {name} ({type(module).__name__}) is not replaced with {type(swap).__name__}: "
                          f"{same}; it is kept as it is", stacklevel=3)
    return new, done


def _check(model, reference, call) -> bool | str:
    """True when `model` gives the reference outputs, else why not."""
    try:
        same = _same(reference, _outputs(model, call))
    except Exception as err:  # noqa: BLE001  (the model's code may expect the original's attributes)
        return f"the model fails with it ({type(err).__name__}: {str(err)[:200]})"
    return same or "it changes the outputs on the example inputs"


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _outputs(model, call):
    with torch.no_grad():
        return [t.detach().double() for t in tensors(call(model)) if t.is_floating_point()]


def _same(a, b) -> bool:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return False
    scale = max([float(x.abs().max()) for x in a if x.numel()] + [1e-12])
    return all(float((x - y).abs().max()) <= 1e-5 * scale for x, y in zip(a, b) if x.numel())


# --- nn.MultiheadAttention ---------------------------------------------------------------------------------------
class SplitMultiheadAttention(nn.Module):
    """`nn.MultiheadAttention` with separate q, k, v and out `Linear` layers (same call, same results): prunable
    by whole heads, with `num_heads` rewritten. Attention weights (need_weights=True) are computed outside the
    trace, from the same q and k: a model that only returns or discards them prunes; one whose output uses them
    is caught by `verify` (pruned heads change the average) and frozen."""

    # what nn.TransformerEncoderLayer reads to choose its fused fast path: without a fused in-projection it takes
    # the plain path, which calls this module
    in_proj_weight = in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        e, h = mha.embed_dim, mha.num_heads
        self.num_heads, self.head_dim = h, e // h
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        bias = mha.in_proj_bias is not None
        self.q, self.k, self.v = nn.Linear(e, e, bias), nn.Linear(mha.kdim, e, bias), nn.Linear(mha.vdim, e, bias)
        self.out_proj = nn.Linear(e, e, mha.out_proj.bias is not None)
        with torch.no_grad():
            weights = (mha.in_proj_weight.chunk(3) if mha._qkv_same_embed_dim
                       else (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight))
            biases = mha.in_proj_bias.chunk(3) if bias else (None,) * 3
            for layer, w, b in zip((self.q, self.k, self.v), weights, biases):
                layer.weight.copy_(w)
                if b is not None:
                    layer.bias.copy_(b)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)
        self.to(mha.out_proj.weight.device, mha.out_proj.weight.dtype)

    @classmethod
    def of(cls, mha: nn.MultiheadAttention) -> SplitMultiheadAttention | None:
        """The replacement, or None for what it does not compute (bias_k/bias_v, add_zero_attn)."""
        return None if mha.bias_k is not None or mha.add_zero_attn else cls(mha)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if is_causal and attn_mask is None:
            raise RuntimeError("need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if not self.batch_first or unbatched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length, source = query.shape[0], query.shape[1], key.shape[1]
        q, k, v = (self._heads(f(t)) for f, t in ((self.q, query), (self.k, key), (self.v, value)))
        mask = _float_mask(attn_mask, key_padding_mask, n, length, source, q.dtype)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, self.num_heads * self.head_dim))
        weights = _weights(q, k, mask, average_attn_weights) if need_weights else None
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out, weights = out.squeeze(1), None if weights is None else weights.squeeze(0)
        return out, weights

    def _heads(self, t):
        return t.view(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)


def _float_mask(attn_mask, key_padding_mask, n, length, source, dtype):
    """nn.MultiheadAttention's two masks as one additive float mask broadcast to (n, heads, length, source)."""
    masks = []
    if attn_mask is not None:
        m = attn_mask.view(n, -1, length, source) if attn_mask.dim() == 3 else attn_mask.view(1, 1, length, source)
        masks.append(m)
    if key_padding_mask is not None:
        masks.append(key_padding_mask.view(n, 1, 1, source))
    total = None
    for m in masks:
        if m.dtype == torch.bool:  # where, not zeros().masked_fill: a traced mask keeps its channels (heads)
            m = torch.where(m, torch.tensor(float("-inf"), dtype=dtype, device=m.device),
                            torch.tensor(0.0, dtype=dtype, device=m.device))
        else:
            m = m.to(dtype)
        total = m if total is None else total + m
    return total


def _weights(q, k, mask, average):
    """softmax(q kᵀ / sqrt(d) + mask), averaged over heads when asked, computed outside any trace."""
    with torch._C.DisableTorchFunction():
        scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5)
        weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
        return weights.mean(dim=1) if average else weights


# --- smp's MiT (SegFormer encoder) attention --------------------------------------------------------------------
class MiTAttention(nn.Module):
    """segmentation_models_pytorch's Mix-Transformer attention with its head size held in `self.head_dim`, not
    computed from the input's width: its stream is LayerNorm-normalised (frozen), and `C // self.num_heads` would tie
    the heads to it. Same submodules, same weights, same results; whole heads are cut, `num_heads` rewritten."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.num_heads, self.head_dim = attention.num_heads, attention.dim // attention.num_heads
        self.scale, self.sr_ratio = attention.scale, attention.sr_ratio
        for name in ("q", "kv", "attn_drop", "proj", "proj_drop", "sr", "norm"):
            setattr(self, name, getattr(attention, name))

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        b, n = x.shape[0], x.shape[1]
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        if self.sr_ratio > 1:
            x = self.norm(self.sr(x.permute(0, 2, 1).reshape(b, -1, height, width)).flatten(2).permute(0, 2, 1))
        kv = self.kv(x).reshape(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = self.attn_drop(((q @ kv[0].transpose(-2, -1)) * self.scale).softmax(dim=-1))
        out = (attn @ kv[1]).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(out))


# --- transformers' Mask2Former decoder self-attention ----------------------------------------------------------
class DetrStyleAttention(nn.Module):
    """transformers' `Mask2FormerAttention` (DETR-style: sequence-first, position embeddings added to the queries and
    keys, not the values) with its heads merged back to `num_heads * head_dim` where the original reshapes to the
    width it read from its input (`embed_dim` of `hidden_states.size()`): that stream is LayerNorm-normalised
    (frozen), so the read width would freeze the heads. Same submodules, same weights, same results."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.num_heads, self.head_dim = attention.num_heads, attention.head_dim
        self.scaling, self.dropout = attention.scaling, attention.dropout
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self, name, getattr(attention, name))

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, key_value_states=None,
                key_value_position_embeddings=None, output_attentions=False):
        x = hidden_states.permute(1, 0, 2)
        kv = x if key_value_states is None else key_value_states.permute(1, 0, 2)
        pos = position_embeddings if key_value_states is None else key_value_position_embeddings
        keyed = kv if pos is None else kv + pos.permute(1, 0, 2)
        if position_embeddings is not None:
            x = x + position_embeddings.permute(1, 0, 2)
        b, length = x.shape[0], x.shape[1]
        q = self._heads(self.q_proj(x) * self.scaling, b)
        k, v = self._heads(self.k_proj(keyed), b), self._heads(self.v_proj(kv), b)
        scores = torch.bmm(q, k.transpose(1, 2))
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = F.softmax(scores, dim=-1)
        out = torch.bmm(F.dropout(weights, p=self.dropout, training=self.training), v)
        out = out.view(b, self.num_heads, length, self.head_dim).transpose(1, 2)
        out = self.out_proj(out.reshape(b, length, self.num_heads * self.head_dim)).permute(1, 0, 2)
        return out, (weights.view(b, self.num_heads, length, -1) if output_attentions else None)

    def _heads(self, t, b):
        """(B, N, h*d) -> (B*h, N, d), as the original."""
        return t.view(b, -1, self.num_heads, self.head_dim).transpose(1, 2).contiguous().view(
            b * self.num_heads, -1, self.head_dim)


# --- weight-standardised convolutions (opt-in) ---------------------------------------------------------------------
def baked_conv(conv: nn.Conv2d) -> nn.Conv2d | None:
    """A plain `nn.Conv2d` with the weight that timm's `StdConv2d` / `ScaledStdConv2d` computes on each call (each
    filter standardised over its inputs, times `gain * scale` when scaled); None for a padding mode it lacks."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    gain = getattr(conv, "gain", None)
    with torch.no_grad():
        weight = F.batch_norm(conv.weight.reshape(1, conv.out_channels, -1), None, None,
                              weight=None if gain is None else (gain * conv.scale).view(-1), training=True,
                              momentum=0.0, eps=conv.eps).reshape_as(conv.weight)
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                      conv.groups, conv.bias is not None, device="meta")  # no init: its tensors are set below
    plain.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        plain.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=conv.bias.requires_grad)
    return plain.train(conv.training)


register_replacement(nn.MultiheadAttention, SplitMultiheadAttention.of, name="torch.nn.MultiheadAttention")
for _kind in ("timm.layers.std_conv.StdConv2d", "timm.layers.std_conv.ScaledStdConv2d"):
    register_replacement(_kind, baked_conv, opt_in="weight_standardization", fresh=True)
register_replacement("segmentation_models_pytorch.encoders.mix_transformer.Attention", MiTAttention)
register_replacement("transformers.models.mask2former.modeling_mask2former.Mask2FormerAttention", DetrStyleAttention)
