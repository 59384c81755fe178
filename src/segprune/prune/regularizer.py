"""Sparsity on BN scales, applied to the gradient between `loss.backward()` and `optimizer.step()`.

`BNSparsity` is network slimming (Liu et al. 2017): `gamma.grad += lam * sign(gamma)`, the subgradient of
`lam * sum |gamma|`. `CAPSparsity` is CAP's context-aware guided sparsification (He et al. 2021): the same
penalty weighted per channel, `gamma.grad += lam * w(g) * sign(gamma)`, where the guiding vector `g` says
how much the other channels of the layer depend on each channel (channels others lean on are penalised
less). Passing the channel groups restricts both to norms whose channels can actually be pruned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segprune.prune.criteria import _NORMS
from segprune.prune.graph import ChannelGroup


def _prunable_norms(model: nn.Module, groups: list[ChannelGroup] | None) -> list[tuple[str, nn.Module]]:
    names = None if groups is None else {m.module for g in groups if not g.frozen for m in g.members}
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, _NORMS) and m.weight is not None and (names is None or name in names)]


class BNSparsity:
    """`regularizer(model)` adds `lam * sign(gamma)` to the gradient of every selected norm's weight.

    Args:
        model: the model being trained.
        lam: the L1 strength (Liu et al.: 1e-4 for VGG, 1e-5 for ResNet).
        groups: if given, only norms in prunable groups are penalised.
        warmup: number of calls over which lam ramps linearly from 0 (0 = full strength at once).
    """

    def __init__(self, model: nn.Module, *, lam: float, groups: list[ChannelGroup] | None = None,
                 warmup: int = 0):
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.lam, self.warmup, self.calls = lam, warmup, 0
        self.norms = _prunable_norms(model, groups)

    def strength(self) -> float:
        """lam at this call, after the warm-up ramp."""
        return self.lam * min(1.0, (self.calls + 1) / self.warmup) if self.warmup else self.lam

    def weights(self, name: str, norm: nn.Module) -> torch.Tensor | float:
        """Per-channel weight of the penalty (1 for slimming)."""
        return 1.0

    @torch.no_grad()
    def __call__(self, model: nn.Module | None = None) -> None:
        lam = self.strength()
        for name, norm in self.norms:
            gamma = norm.weight
            if gamma.grad is None:
                gamma.grad = torch.zeros_like(gamma)
            gamma.grad.add_(lam * self.weights(name, norm) * torch.sign(gamma))
        self.calls += 1


class CAPSparsity(BNSparsity):
    """CAP's guided sparsification: slimming's penalty weighted by a context-guided vector per BN layer.

    A forward hook on each selected norm (active in training mode only, under no_grad) takes its activated
    output relu(BN(x)) averaged over the batch, F in R^{C x HW}, builds the channel affinity A = softmax_row(S / T)
    of similarities S ("dot": F F^T over the mean squared channel norm; "cosine") at temperature T, without each
    channel's affinity to itself, and the guiding vector g_c = sum_{j != c} A_jc: how much the other channels lean
    on channel c. g has mean 1 (every row of A sums to 1). An EMA smooths it. The penalty weight is
    1 - g / max g + eps ("one_minus", the default), or 1 / (g + eps) normalised to mean 1 ("inverse": the layer's
    total penalty is slimming's, CAP only moves it from channels others depend on to channels nobody does); "none"
    gives w = 1, which is network slimming exactly. On CamVid (PSPNet-R18, three seeds, benchmarks/camvid_seeds.py)
    "one_minus" beat slimming by +1.4 and +1.2 mIoU at 50 % and 30 % of the MACs, "inverse" trailed it by 1.5 and
    3.6; "one_minus" also lowers the layer's total penalty (w <= 1), which may account for part of that. [R] marks
    these as reconstructions (../METHODS.md); each is a named option. `remove()` takes the hooks out: nothing of
    CAP stays in the model.

    Why no self-affinity and a temperature: a channel's similarity to itself is the largest in its row, so with
    raw dot products over H*W positions the softmax is one-hot on the diagonal, g is the same for every channel
    and the guidance says nothing (with "one_minus" it even switched the penalty off: w = eps everywhere).

    Args:
        every: update the guiding vectors every `every` training forward passes (cost control).
        temperature: of the affinity softmax; similarities are in [0, 1]-ish, so 0.1 spreads them over e^10.
    """

    AFFINITIES = ("dot", "cosine")
    WEIGHTS = ("inverse", "one_minus", "none")

    def __init__(self, model: nn.Module, *, lam: float, groups: list[ChannelGroup] | None = None, warmup: int = 0,
                 affinity: str = "dot", weight: str = "one_minus", momentum: float = 0.9, eps: float = 1e-3,
                 every: int = 1, temperature: float = 0.1):
        super().__init__(model, lam=lam, groups=groups, warmup=warmup)
        if affinity not in self.AFFINITIES or weight not in self.WEIGHTS:
            raise ValueError(f"affinity must be one of {self.AFFINITIES} and weight one of {self.WEIGHTS}; "
                             f"got {affinity!r}, {weight!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.affinity, self.weight, self.momentum, self.eps, self.every = affinity, weight, momentum, eps, every
        self.temperature = temperature
        self.guide: dict[str, torch.Tensor] = {}
        self.seen: dict[str, int] = {}
        self.handles = [] if weight == "none" else [norm.register_forward_hook(self._hook(name))
                                                     for name, norm in self.norms]

    def _hook(self, name: str):
        def update(module, args, out):
            count = self.seen.get(name, 0)
            self.seen[name] = count + 1
            if module.training and count % self.every == 0 and out.dim() >= 3:
                with torch.no_grad():
                    g = guiding_vector(out.detach(), affinity=self.affinity, temperature=self.temperature)
                    old = self.guide.get(name)
                    self.guide[name] = g if old is None else self.momentum * old + (1 - self.momentum) * g
        return update

    def weights(self, name: str, norm: nn.Module) -> torch.Tensor | float:
        g = self.guide.get(name)
        if self.weight == "none" or g is None:
            return 1.0
        if self.weight == "one_minus":
            return 1.0 - g / g.max().clamp_min(1e-12) + self.eps
        w = 1.0 / (g + self.eps)
        return w / w.mean()

    def remove(self) -> None:
        """Take CAP's hooks out of the model (for inference and export)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []


def guiding_vector(out: torch.Tensor, *, affinity: str = "dot", temperature: float = 0.1) -> torch.Tensor:
    """CAP's context guiding vector of one layer's output (N, C, *spatial): how strongly the other channels
    attend to each channel; mean 1 over the channels."""
    feats = F.relu(out).float().mean(0).flatten(1)  # (C, HW): the activated output, averaged over the batch
    if affinity == "cosine":
        feats = F.normalize(feats, dim=1)
        sim = feats @ feats.T
    else:
        sim = feats @ feats.T
        sim = sim / sim.diagonal().mean().clamp_min(1e-12)
    if sim.shape[0] == 1:
        return torch.ones(1, device=out.device)
    sim.fill_diagonal_(float("-inf"))  # attention to oneself is not context
    attention = torch.softmax(sim / temperature, dim=1)  # row j: how channel j spreads its attention
    return attention.sum(0)  # column sums: how much the others attend to channel c
