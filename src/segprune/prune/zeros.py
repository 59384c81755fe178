"""Which ops map 0 to 0: the condition under which the masked model defines what a pruned model computes.

A removed channel is zero at its producer in the masked model. If every op between the producer and a consumer
maps 0 to 0, the consumer sees zeros on that channel and dropping the channel changes nothing. An op that does
not (sigmoid(0) = 0.5, x + 1, an affine-free norm, pad with a value) still feeds the consumer a constant, which
the pruned model would drop. The tracer tags each tensor with the first such op on its path (`nonzero`); a
consumer (conv, linear) that reads a tagged tensor is recorded in `st.offsets`, and `prune` then measures the
constants and folds them into the consumer's bias where that is exact, or freezes the channels with a warning
(see fold.py).
"""

from __future__ import annotations

import numbers

import torch

from segprune._utils import tensors
from segprune.prune.rules import _arg

# f(0) != 0 (or undefined): a removed channel leaves them as a constant
NONZERO = set(
    "sigmoid hardsigmoid exp exp2 softplus logsigmoid log log2 log10 rsqrt reciprocal cos cosh erfc sigmoid_ "
    "ones_like full_like empty_like rand_like randn_like fill softmax log_softmax softmin "
    "eq ne le ge logical_not bitwise_not".split()
)
# outputs that no longer depend on whether an input channel was removed: a removed channel is zero here
RESET = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear",
         "zeros_like", "zero", "new_zeros"}
_ADDITIVE = {"add", "sub", "rsub"}
# products and contractions: a traced factor carries the same channel in every traced operand (rules/attention.py)
_PRODUCTS = {"mul", "matmul", "rmatmul", "mm", "bmm", "einsum"}
_NORMS = {"batch_norm", "group_norm", "layer_norm", "instance_norm"}


def nonzero_tag(st, name: str, args, kwargs) -> str | None:
    """The tag of the op's outputs: which op (if any) makes a removed channel nonzero there."""
    if name in RESET:
        return None
    traced = [st.get(t) for t in tensors((args, kwargs)) if st.get(t) is not None]
    inherited = next((i.nonzero for i in traced if i.nonzero), None)
    here = f"{name} (in {st.where})"
    if name in NONZERO or (name in ("clamp", "clip", "clamp_min") and _clamps_above_zero(args, kwargs)):
        return here
    if name in _NORMS:
        return _norm_tag(name, args, kwargs, here, inherited)
    if name == "pad":
        value = _arg(args, kwargs, 3, "value", 0) or 0
        mode = _arg(args, kwargs, 2, "mode", "constant")
        return here if mode == "constant" and value != 0 else inherited
    if name in _ADDITIVE and _adds_a_constant(st, args, kwargs):
        return f"{name} of a constant (in {st.where})"
    if name in _PRODUCTS:  # 0 * anything = 0: the product is tagged only when every factor of the channels is
        return _product_tag(st, traced, inherited)
    if name == "scaled_dot_product_attention":  # a removed head or value feature is zero in v, so in the output
        value = st.get(_arg(args, kwargs, 2, "value"))
        return value.nonzero if value is not None else None
    if name in ("div", "true_divide"):
        first = st.get(args[0]) if args else None
        return first.nonzero if first is not None else here
    return inherited


def _product_tag(st, traced, inherited):
    """The factors that carry the cut channels are the widest traced operands; a one-channel gate broadcast onto
    them, or channels tied to nothing (attention scores), multiply a removed channel by a nonzero constant."""
    widest = max((len(i.ids) for i in traced), default=0)
    factors = [i for i in traced if len(i.ids) == widest and not st.is_free(i)]
    if not factors:
        return inherited
    return factors[0].nonzero if all(i.nonzero for i in factors) else None


def _norm_tag(name, args, kwargs, here, inherited):
    """A norm with an affine weight is masked to zero with its group (see oracle.py); without, it is not:
    batch norm maps 0 to -mean/std, a group or layer norm mixes the channel with the others."""
    index = {"batch_norm": 3, "instance_norm": 3, "group_norm": 2, "layer_norm": 2}[name]
    weight = _arg(args, kwargs, index, "weight")
    if weight is not None:
        return None
    return inherited if name == "instance_norm" else here


def _clamps_above_zero(args, kwargs) -> bool:
    low = _arg(args, kwargs, 1, "min")
    high = _arg(args, kwargs, 2, "max")
    above = isinstance(low, numbers.Number) and low > 0
    below = isinstance(high, numbers.Number) and high < 0
    return above or below or isinstance(low, torch.Tensor) or isinstance(high, torch.Tensor)


def _adds_a_constant(st, args, kwargs) -> bool:
    """x + c with c a nonzero number or an untraced tensor that is not all zeros (a parameter, ones_like)."""
    for a in list(args[:2]) + [kwargs.get("other")]:
        if isinstance(a, numbers.Number) and not isinstance(a, bool) and a != 0:
            return True
        if isinstance(a, torch.Tensor) and st.get(a) is None and a.numel() and bool((a != 0).any()):
            return True
    return False
