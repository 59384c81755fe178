"""Knowledge distillation for fine-tuning a pruned model from its unpruned self (Hinton et al. 2015, pixel-wise)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segprune._utils import logits


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Pixel-wise KL(teacher || student) of the class distributions at `temperature`, times T^2 (so the
    gradient scale does not depend on T), averaged over pixels."""
    t = temperature
    log_p = F.log_softmax(student / t, dim=1)
    q = F.softmax(teacher / t, dim=1)
    return F.kl_div(log_p, q, reduction="none").sum(1).mean() * t * t


def distillation(teacher: nn.Module, *, alpha: float, temperature: float = 4.0):
    """An `extra_loss(images, output)` for the training loop: `alpha * kd_loss(student, teacher(images))`.

    The teacher runs in eval mode without gradients; it is not modified.
    """
    if alpha < 0 or temperature <= 0:
        raise ValueError(f"alpha must be >= 0 and temperature > 0, got {alpha}, {temperature}")
    teacher.eval()

    def extra_loss(images: torch.Tensor, output) -> torch.Tensor:
        with torch.no_grad():
            target = logits(teacher(images))
        return alpha * kd_loss(logits(output), target, temperature=temperature)

    return extra_loss
