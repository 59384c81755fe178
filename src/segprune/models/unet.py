"""U-Net (Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for Biomedical Image Segmentation",
MICCAI 2015, arXiv:1505.04597).

Four 2×2 max-pool levels of double 3×3 convs (64 → 1024 channels at width 1); each decoder level upsamples ×2,
halving the channels, concatenates the encoder's skip feature and applies a double conv; a 1×1 classifier ends it.
Deviations: convs are padded (no cropping, output size = input size) and followed by BN; ``upsample="bilinear"``
replaces the 2×2 transposed conv by bilinear ×2 and a 1×1 ConvBnAct (to halve the channels the same way).
"""

from pathlib import Path

import torch
from torch import Tensor, nn

from .backbones import load_backbone_weights
from .layers import ConvBnAct, LayerFn, check_input_size, check_num_classes, init_weights, run_stages, scale_width
from .registry import register_model


def double_conv(in_channels: int, out_channels: int, **kw) -> nn.Sequential:
    """Two 3×3 ConvBnAct, the unit of every U-Net level."""
    return nn.Sequential(ConvBnAct(in_channels, out_channels, 3, **kw), ConvBnAct(out_channels, out_channels, 3, **kw))


class UNetEncoder(nn.Module):
    """Contracting path; ``forward`` returns the five level features at strides 1, 2, 4, 8, 16."""

    def __init__(self, *, in_channels: int = 3, width: float = 1.0, depth: int = 4, **kw):
        super().__init__()
        self.out_channels = [scale_width(64 * 2**i, width) for i in range(depth + 1)]
        self.output_stride = 2**depth
        self.stages = nn.ModuleList([double_conv(in_channels, self.out_channels[0], **kw)])
        for c_in, c_out in zip(self.out_channels[:-1], self.out_channels[1:], strict=True):
            self.stages.append(nn.Sequential(nn.MaxPool2d(2, stride=2), double_conv(c_in, c_out, **kw)))

    def forward(self, x: Tensor) -> list[Tensor]:
        return run_stages(self.stages, x)


class UpBlock(nn.Module):
    """Upsample ×2 to the skip's width, concatenate [skip, upsampled], double conv."""

    def __init__(self, in_channels: int, skip_channels: int, *, upsample: str = "transpose", **kw):
        super().__init__()
        if upsample == "transpose":
            self.up = nn.ConvTranspose2d(in_channels, skip_channels, 2, stride=2)
        elif upsample == "bilinear":
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                ConvBnAct(in_channels, skip_channels, 1, **kw),
            )
        else:
            raise ValueError(f"upsample must be 'transpose' or 'bilinear', got {upsample!r}")
        self.conv = double_conv(2 * skip_channels, skip_channels, **kw)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """U-Net built from its encoder's ``out_channels``."""

    needs_divisible_input = 16  # 2**depth: a skip and its upsampled partner must have the same size to concatenate
    exportable = True
    use_aux = False

    def __init__(
        self,
        encoder: UNetEncoder,
        *,
        num_classes: int,
        upsample: str = "transpose",
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: LayerFn = nn.ReLU,
    ):
        super().__init__()
        kw = dict(norm_layer=norm_layer, act_layer=act_layer)
        self.num_classes = check_num_classes(num_classes)
        self.encoder = encoder
        self.needs_divisible_input = encoder.output_stride
        chs = encoder.out_channels
        # Deepest level first, the order in which the decoder runs.
        self.decoder = nn.ModuleList(
            UpBlock(chs[i], chs[i - 1], upsample=upsample, **kw) for i in reversed(range(1, len(chs)))
        )
        self.classifier = nn.Conv2d(chs[0], num_classes, 1)
        init_weights(self)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        check_input_size(x, self.needs_divisible_input)
        *skips, x = self.encoder(x)
        for block, skip in zip(self.decoder, reversed(skips), strict=True):
            x = block(x, skip)
        return {"out": self.classifier(x)}


def _create_unet(
    *,
    num_classes: int,
    in_channels: int = 3,
    width: float = 1.0,
    norm_layer: LayerFn = nn.BatchNorm2d,
    act_layer: LayerFn = nn.ReLU,
    upsample: str = "transpose",
    backbone_weights: str | Path | None = None,
) -> UNet:
    kw = dict(norm_layer=norm_layer, act_layer=act_layer)
    model = UNet(
        UNetEncoder(in_channels=in_channels, width=width, **kw), num_classes=num_classes, upsample=upsample, **kw
    )
    if backbone_weights is not None:
        load_backbone_weights(model.encoder, backbone_weights)
    return model


@register_model
def unet(*, num_classes: int, **kwargs) -> UNet:
    return _create_unet(num_classes=num_classes, **kwargs)


@register_model
def test_unet(*, num_classes: int, **kwargs) -> UNet:
    return _create_unet(num_classes=num_classes, **{"width": 1 / 32, **kwargs})
