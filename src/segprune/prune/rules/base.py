"""The rule table and what every rule shares: `rule` registers, `op_name` folds spellings, `unknown`
freezes what no rule covers, `constant` marks ops whose outputs carry no traced channels."""

from __future__ import annotations

from segprune._utils import tensors
from segprune.prune.state import TraceState

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


# binary ops (elementwise.py), whose reflected and in-place dunders op_name folds onto one name
_BINARY = (
    "add sub mul div true_divide floor_divide remainder fmod pow maximum minimum rsub where lerp addcmul addcdiv "
    "eq ne lt le gt ge logical_and logical_or logical_xor and or xor bitwise_and bitwise_or bitwise_xor "
    "masked_fill atan2 hypot copysign copy"
).split()


# --- ops that make tensors from nothing traced --------------------------------------------------------
@rule("zeros", "ones", "empty", "full", "arange", "linspace", "rand", "randn", "randint", "tensor", "as_tensor",
      "eye", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "size", "dim", "numel", "item",
      "tolist", "get", "shape", "is_contiguous", "stride", "data_ptr", "element_size", "len", "bool", "float_",
      "int", "index", "format", "repr", "hash", "is_floating_point", "is_complex", "nonzero_static")


def constant(st, args, kwargs, out):
    """Outputs carry no traced channels; a later elementwise op freezes whatever they would need."""
