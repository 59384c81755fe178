"""Small building blocks shared by the architectures."""

import numbers
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

LayerFn = Callable[..., nn.Module]


def scale_width(channels: int, width: float, min_channels: int = 4) -> int:
    """Scale a channel count by the width multiplier, rounding to nearest.

    Args:
        channels: channel count at width 1.
        width: channel multiplier.
        min_channels: floor, so tiny widths still leave every layer a few channels.
    """
    return max(min_channels, int(channels * width + 0.5))


class ConvBnAct(nn.Sequential):
    """Conv (no bias, the norm has one) → norm named ``bn`` → activation named ``act``.

    The fixed names let BN fusion and BN-based criteria find the norm by structure. ``act_layer=None``
    leaves the activation out (a projection before a residual add).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: LayerFn | None = nn.ReLU,
    ):
        super().__init__()
        padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False)
        self.bn = norm_layer(out_channels)
        if act_layer is not None:
            self.act = act_layer()


def check_num_classes(num_classes: int) -> int:
    """Return ``num_classes`` if it is a positive integer; raise ``ValueError`` at build time otherwise."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def check_input_size(x: Tensor, divisor: int) -> None:
    """Raise ``ValueError`` when the input's height or width is not a multiple of ``divisor``.

    Reads plain ints from ``x.shape`` (no tensor ops), so tracing and export see nothing; divisor 1 costs nothing.
    """
    if divisor == 1:
        return
    height, width = x.shape[-2:]
    if height % divisor or width % divisor:
        raise ValueError(
            f"input size {height}×{width} is not divisible by {divisor}: pad or crop H and W to multiples of {divisor}"
        )


def upsample_like(x: Tensor, ref: Tensor) -> Tensor:
    """Bilinearly resize ``x`` to the spatial size of ``ref`` (read from the tensor, never cached)."""
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


def init_weights(module: nn.Module) -> None:
    """He-normal init for convolutions (fan-out, as torchvision); norms keep their (1, 0) defaults."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def run_stages(stages: nn.Module, x: Tensor) -> list[Tensor]:
    """Run `stages` one after another and return every stage's output (an encoder's feature list)."""
    feats = []
    for stage in stages:
        x = stage(x)
        feats.append(x)
    return feats
