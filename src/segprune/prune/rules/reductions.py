"""Reductions and ops along one dim: over the channels they freeze them, elsewhere the channels pass."""

from __future__ import annotations

import torch

from segprune._utils import tensors
from segprune.prune.rules.base import _arg, _dim, rule
from segprune.prune.rules.elementwise import elementwise


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
