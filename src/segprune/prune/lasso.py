"""Channel selection by LASSO with least-squares reconstruction (He, Zhang, Sun, ICCV 2017), for one
consumer convolution at a time.

The consumer's output is a sum of per-input-channel contributions, ``Y = sum_c Z_c``. LASSO on channel gates
``beta`` (``min ||Y - sum_c beta_c Z_c||^2 + lam ||beta||_1``, lam raised until few enough gates are non-zero)
picks the channels to keep; the consumer's weights on the kept channels are then refitted by least squares
so that its output stays close to the original. Both are fitted on activations sampled at random positions
of a few batches. LASSO is solved by FISTA on the Gram matrix (plain torch; no sklearn).

Only groups whose channels feed exactly one plain convolution (`consumer_of`) are selected this way: there
the consumer's output is the only thing the removed channels change, so refitting it is the whole repair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segprune._utils import eval_mode
from segprune.prune.graph import ChannelGroup
from segprune.prune.plan import Plan
from segprune.prune.trace import as_call


@dataclass
class LayerSamples:
    """A consumer conv's input patches and its output (without bias) at sampled positions, in float64."""

    patches: torch.Tensor  # (S, C, kh*kw)
    target: torch.Tensor  # (S, O)


@dataclass
class Reconstruction:
    """New weights for a consumer: `weight[:, j]` multiplies input position `positions[j]` (original numbering);
    its output channels are in the original numbering too."""

    positions: np.ndarray
    weight: torch.Tensor  # (O, len(positions), kh, kw)


def consumer_of(group: ChannelGroup, model: nn.Module) -> str | None:
    """The one plain Conv2d that consumes `group`'s channels (each at one input position), or None when LASSO
    selection does not apply (several consumers, grouped or transposed conv, string padding, ...)."""
    ins = [m for m in group.members if m.role == "in"]
    if len(ins) != 1:
        return None
    conv = model.get_submodule(ins[0].module)
    plain = type(conv) is nn.Conv2d and conv.groups == 1 and conv.padding_mode == "zeros"
    if not plain or isinstance(conv.padding, str):
        return None
    return ins[0].module if np.array_equal(np.sort(ins[0].index), np.arange(group.size)) else None


def sample_layer(model: nn.Module, name: str, batches, *, samples: int = 2000, seed: int = 0) -> LayerSamples:
    """Run `model` (eval mode, no grad) on `batches` ((input, target) pairs) and sample the input patches and
    bias-free output of conv `name` at `samples` random positions spread over the batches."""
    conv = model.get_submodule(name)
    batches = list(batches)
    g = torch.Generator().manual_seed(seed)
    per_call = math.ceil(samples / max(len(batches), 1))
    grabbed: list[torch.Tensor] = []  # patches only: whole activations of every batch would not fit at full size
    handle = conv.register_forward_hook(lambda m, args, out: grabbed.append(_patches(m, args[0].double(), per_call, g)))
    try:
        with eval_mode(model), torch.no_grad():
            for inputs, _ in batches:
                args, kwargs = as_call(inputs)
                model(*args, **kwargs)
    finally:
        handle.remove()
    if not grabbed:
        raise ValueError(f"{name} was not called on the sampling batches")
    patches = torch.cat(grabbed)
    weight = conv.weight.detach().double().flatten(1)
    return LayerSamples(patches, patches.flatten(1) @ weight.T)


def _patches(conv: nn.Conv2d, x: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """(n, C, kh*kw) input patches of `conv` at random output positions of the batch `x`."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    xp = F.pad(x, (pw, pw, ph, ph))
    out_h = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    idx = torch.randint(0, x.shape[0] * out_h * out_w, (n,), generator=g)
    b, oy, ox = idx // (out_h * out_w), idx // out_w % out_h, idx % out_w
    ky, kx = torch.meshgrid(torch.arange(kh), torch.arange(kw), indexing="ij")
    rows = oy[:, None] * sh + ky.flatten()[None] * dh
    cols = ox[:, None] * sw + kx.flatten()[None] * dw
    return xp[b[:, None], :, rows, cols].permute(0, 2, 1)  # advanced dims first: (n, k, C) -> (n, C, k)


def gram(samples: LayerSamples, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G = Z Z^T and b = Z y for the per-channel contributions Z_c = patches_c @ W_c^T, in chunks of samples."""
    w = weight.detach().double().flatten(2)  # (O, C, k)
    c, o = w.shape[1], w.shape[0]
    chunk = max(1, int(2e7 // max(c * o, 1)))
    G, b = torch.zeros(c, c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    for start in range(0, len(samples.patches), chunk):
        z = torch.einsum("sck,ock->cso", samples.patches[start:start + chunk], w).flatten(1)
        G += z @ z.T
        b += z @ samples.target[start:start + chunk].flatten()
    return G, b


def lasso_path_select(G: torch.Tensor, b: torch.Tensor, *, keep: int, removable: np.ndarray,
                      iters: int = 300, rounds: int = 40) -> np.ndarray:
    """Channels to keep: all non-removable ones plus `keep` removable ones, those whose LASSO gates survive the
    largest penalty (bisection on lam; columns normalised so the penalty treats channels alike)."""
    free = torch.as_tensor(removable, dtype=torch.bool)
    if keep >= int(free.sum()):
        return np.arange(len(b))
    scale = G.diagonal().clamp_min(1e-30).sqrt()
    Gn, bn = G / scale[:, None] / scale[None], b / scale
    lo, hi = 0.0, float(bn[free].abs().max()) * 2 + 1e-30
    beta, best = torch.zeros_like(bn), None
    step = 1.0 / float(torch.linalg.eigvalsh(Gn)[-1].clamp_min(1e-30))
    for _ in range(rounds):
        lam = math.sqrt(max(lo, hi * 1e-8) * hi)  # geometric bisection
        beta = _fista(Gn, bn, lam * free.double(), beta, iters, step)
        alive = int((beta[free].abs() > 1e-12).sum())
        if alive >= keep:
            lo, best = lam, beta.clone()
        else:
            hi = lam
        if alive == keep:
            break
    if best is None:  # even a vanishing penalty zeroes too many gates: rank by the unpenalised fit
        best = _fista(Gn, bn, torch.zeros_like(bn), beta, iters, step)
    score = best.abs().masked_fill(~free, -1.0)
    chosen = torch.topk(score, keep).indices.numpy() if keep else np.array([], dtype=np.int64)
    return np.sort(np.concatenate([np.flatnonzero(~removable), chosen]))


def _fista(G: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, beta: torch.Tensor, iters: int,
           step: float) -> torch.Tensor:
    """min 1/2 beta^T G beta - b^T beta + sum lam_c |beta_c| by FISTA (warm-started; step = 1 / largest
    eigenvalue of G)."""
    x, y, t = beta.clone(), beta.clone(), 1.0
    for _ in range(iters):
        z = y - step * (G @ y - b)
        x_new = z.sign() * (z.abs() - step * lam).clamp_min(0)
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y, x, t = x_new + (t - 1) / t_new * (x_new - x), x_new, t_new
    return x


def least_squares(samples: LayerSamples, positions: np.ndarray, *, ridge: float = 1e-8) -> torch.Tensor:
    """Weights (O, len(positions) * k) on the kept input positions minimising ||Y - P_kept W^T||^2 (a tiny ridge
    keeps it solvable when the sampled patches are rank-deficient)."""
    p = samples.patches[:, torch.as_tensor(positions, dtype=torch.long)].flatten(1)
    a = p.T @ p
    a += torch.eye(len(a), dtype=a.dtype) * ridge * (float(a.diagonal().mean()) + 1e-30)
    return torch.linalg.solve(a, p.T @ samples.target).T


def reconstruction_error(samples: LayerSamples, positions: np.ndarray, weight: torch.Tensor) -> float:
    """||Y - P_kept W^T|| / ||Y|| on the samples for consumer weights `weight` on input `positions`."""
    p = samples.patches[:, torch.as_tensor(positions, dtype=torch.long)].flatten(1)
    y = p @ weight.double().flatten(1).T
    return float((samples.target - y).norm() / samples.target.norm().clamp_min(1e-30))


def select_channels(model: nn.Module, group: ChannelGroup, consumer: str, batches, *, drop: int,
                    samples: int = 2000, seed: int = 0) -> tuple[np.ndarray, Reconstruction]:
    """LASSO-select `drop` prunable channels of `group` to remove and refit `consumer` on the rest.

    Returns:
        The removed channels (group numbering) and the consumer's reconstructed weights.
    """
    conv = model.get_submodule(consumer)
    index = next(m.index for m in group.members if m.module == consumer and m.role == "in")
    data = sample_layer(model, consumer, batches, samples=samples, seed=seed)
    G, b = gram(data, conv.weight)
    removable = group.prunable[index]  # per input position
    if not 0 <= drop <= removable.sum():
        raise ValueError(f"{consumer}: cannot drop {drop} of its {int(removable.sum())} removable input channels")
    kept_positions = lasso_path_select(G, b, keep=int(removable.sum()) - drop, removable=removable)
    weight = least_squares(data, kept_positions).reshape(conv.out_channels, len(kept_positions), *conv.kernel_size)
    dropped = np.setdiff1d(np.arange(len(index)), kept_positions)
    return np.sort(index[dropped]), Reconstruction(kept_positions, weight.to(conv.weight.dtype))


def apply_reconstruction(model: nn.Module, recon: dict[str, Reconstruction], plan: Plan | None = None) -> None:
    """Write reconstructed consumer weights into `model`: a model cut by `plan` (its kept output channels are
    taken from the plan), or, with no plan, the unpruned (or masked) model, where only the kept input
    columns are overwritten."""
    with torch.no_grad():
        for name, r in recon.items():
            conv = model.get_submodule(name)
            if plan is None:
                conv.weight[:, torch.as_tensor(r.positions, dtype=torch.long)] = r.weight.to(conv.weight)
                continue
            rows = plan.modules.get(name, {}).get("out")
            w = r.weight if rows is None else r.weight[torch.as_tensor(rows, dtype=torch.long)]
            if w.shape != conv.weight.shape:
                raise ValueError(f"reconstruction for {name} has shape {tuple(w.shape)}, the layer "
                                 f"{tuple(conv.weight.shape)}")
            conv.weight.copy_(w.to(conv.weight))
