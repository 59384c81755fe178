"""DeepLabV3+ (Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic Image Segmentation",
ECCV 2018, arXiv:1802.02611).

ASPP on the deepest feature: a 1×1 branch, three 3×3 atrous branches at rates 6/12/18 for output stride 16 (doubled
at output stride 8) and an image-pooling branch (global average pool → 1×1 conv → BN → ReLU → upsample), all at 256
channels, concatenated and projected by a 1×1 ConvBnAct (+ dropout 0.1). The decoder reduces the stride-4 feature to
48 channels with a 1×1 ConvBnAct, concatenates the upsampled ASPP output and applies two 3×3 ConvBnAct (256) and a
1×1 classifier; logits are upsampled ×4 to the input. ``separable=True`` makes the 3×3 convs of ASPP and decoder
depthwise-separable (depthwise 3×3 + BN + ReLU, pointwise 1×1 + BN + ReLU), the paper's option used with Xception.
Deviations: ResNet backbones keep the 7×7 stem (as torchvision; the paper's ResNet-101 is "beta", with a deep stem),
MobileNetV2 replaces Xception as the light backbone (with separable ASPP and decoder by default).
"""

from pathlib import Path

import torch
from torch import Tensor, nn

from .backbones import load_backbone_weights, mobilenetv2, resnet
from .layers import ConvBnAct, LayerFn, check_input_size, check_num_classes, init_weights, scale_width, upsample_like
from .registry import register_model


class SeparableConvBnAct(nn.Sequential):
    """Depthwise 3×3 ConvBnAct then pointwise 1×1 ConvBnAct."""

    def __init__(self, in_channels: int, out_channels: int, *, dilation: int = 1, **kw):
        super().__init__()
        self.depthwise = ConvBnAct(in_channels, in_channels, 3, dilation=dilation, groups=in_channels, **kw)
        self.pointwise = ConvBnAct(in_channels, out_channels, 1, **kw)


def conv3x3(in_channels: int, out_channels: int, *, dilation: int = 1, separable: bool = False, **kw) -> nn.Module:
    """A 3×3 ConvBnAct, depthwise-separable when ``separable``."""
    if separable:
        return SeparableConvBnAct(in_channels, out_channels, dilation=dilation, **kw)
    return ConvBnAct(in_channels, out_channels, 3, dilation=dilation, **kw)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1×1, atrous 3×3 at each rate, image pooling; concat; 1×1 projection."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rates: tuple[int, ...],
        *,
        separable: bool = False,
        dropout: float = 0.1,
        **kw,
    ):
        super().__init__()
        self.branches = nn.ModuleList([ConvBnAct(in_channels, out_channels, 1, **kw)])
        self.branches.extend(conv3x3(in_channels, out_channels, dilation=r, separable=separable, **kw) for r in rates)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvBnAct(in_channels, out_channels, 1, **kw))
        self.project = nn.Sequential(
            ConvBnAct((len(rates) + 2) * out_channels, out_channels, 1, **kw),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        feats = [branch(x) for branch in self.branches]
        feats.append(upsample_like(self.pool(x), x))
        return self.project(torch.cat(feats, dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ on a backbone publishing ``out_channels`` and ``output_stride``, whose second feature is at
    stride 4 (the decoder's low-level input) and last feature feeds ASPP."""

    needs_divisible_input = 1  # any size: ASPP output and logits are resized to the low-level feature and the input
    exportable = True
    use_aux = False

    def __init__(
        self,
        backbone: nn.Module,
        *,
        num_classes: int,
        width: float = 1.0,
        separable: bool = False,
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: LayerFn = nn.ReLU,
    ):
        super().__init__()
        if backbone.output_stride not in (8, 16):
            raise ValueError(f"DeepLabV3+ needs output_stride 8 or 16, got {backbone.output_stride}")
        kw = dict(norm_layer=norm_layer, act_layer=act_layer)
        self.num_classes = check_num_classes(num_classes)
        self.backbone = backbone
        rates = tuple(r * 16 // backbone.output_stride for r in (6, 12, 18))
        channels, low_channels = scale_width(256, width), scale_width(48, width)
        self.aspp = ASPP(backbone.out_channels[-1], channels, rates, separable=separable, **kw)
        self.reduce = ConvBnAct(backbone.out_channels[1], low_channels, 1, **kw)
        self.fuse = nn.Sequential(
            conv3x3(channels + low_channels, channels, separable=separable, **kw),
            conv3x3(channels, channels, separable=separable, **kw),
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        init_weights(self)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        check_input_size(x, self.needs_divisible_input)
        feats = self.backbone(x)
        low = self.reduce(feats[1])
        high = upsample_like(self.aspp(feats[-1]), low)
        logits = self.classifier(self.fuse(torch.cat([high, low], dim=1)))
        return {"out": upsample_like(logits, x)}


def _create_deeplabv3plus(
    backbone: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    width: float = 1.0,
    norm_layer: LayerFn = nn.BatchNorm2d,
    act_layer: LayerFn = nn.ReLU,
    output_stride: int = 16,
    separable: bool = False,
    backbone_weights: str | Path | None = None,
) -> DeepLabV3Plus:
    kw = dict(
        in_channels=in_channels, width=width, output_stride=output_stride, norm_layer=norm_layer, act_layer=act_layer
    )
    encoder = mobilenetv2(**kw) if backbone == "mobilenetv2" else resnet(backbone, **kw)
    model = DeepLabV3Plus(
        encoder, num_classes=num_classes, width=width, separable=separable, norm_layer=norm_layer, act_layer=act_layer
    )
    if backbone_weights is not None:
        load_backbone_weights(model.backbone, backbone_weights)
    return model


# The tiny sibling keeps every structural feature: inverted residuals, depthwise convs, separable ASPP and decoder.
_TEST_ARGS = {"width": 1 / 8, "separable": True}


@register_model
def deeplabv3plus_resnet50(*, num_classes: int, **kwargs) -> DeepLabV3Plus:
    return _create_deeplabv3plus("resnet50", num_classes=num_classes, **kwargs)


@register_model
def deeplabv3plus_resnet101(*, num_classes: int, **kwargs) -> DeepLabV3Plus:
    return _create_deeplabv3plus("resnet101", num_classes=num_classes, **kwargs)


@register_model
def deeplabv3plus_mobilenetv2(*, num_classes: int, **kwargs) -> DeepLabV3Plus:
    return _create_deeplabv3plus("mobilenetv2", num_classes=num_classes, **{"separable": True, **kwargs})


@register_model
def test_deeplabv3plus(*, num_classes: int, **kwargs) -> DeepLabV3Plus:
    return _create_deeplabv3plus("mobilenetv2", num_classes=num_classes, **{**_TEST_ARGS, **kwargs})
