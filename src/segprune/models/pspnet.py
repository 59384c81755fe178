"""PSPNet (Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017, arXiv:1612.01105).

A dilated ResNet with the three-conv deep stem at output stride 8; a pyramid pooling module (adaptive average pool
to 1×1, 2×2, 3×3, 6×6 → 1×1 ConvBnAct to C/4 channels → bilinear upsample → concatenated with its input); a head of
3×3 ConvBnAct (512 channels at width 1), Dropout2d(0.1) and a 1×1 classifier; and in training an auxiliary head on
layer3 (3×3 ConvBnAct to ``aux_channels``, 256 by default, dropout, 1×1), whose loss weight (0.4 in the paper) is
the trainer's business.
Deviations: upsampling uses align_corners=False; bottleneck stride on the 3×3 conv (see ``backbones/resnet.py``).

Size at width 1 with 19 classes (``benchmarks/model_sizes.py``; counts tested exactly in ``tests/test_models.py``).
The published figures (CAP's table in METHODS.md: PSPNet-101 70.44 M params and 556.04 GMACs, PSPNet-50 51.45 M and
403.00 GMACs at 713×713) fit an auxiliary head of 512 channels — the "dsn" head of common PyTorch PSPNets (3×3 conv
1024→512, BN, dropout, 1×1) — with MACs counted in training mode, head included. Built with ``aux_channels=512`` we
count 70,436,838 / 555.49 G (PSPNet-101) and 51,444,710 / 402.08 G (PSPNet-50): -0.004 % / -0.10 % and -0.01 % /
-0.23 %. The default ``aux_channels=256`` follows the released PSPNet: 68,072,166 and 49,080,038 parameters (the aux
head is 2.36 M of them) and, in eval mode, 517.2 G and 363.8 G. The aux head only matters for training: it is never
in an exported model. 713 = 8·89 + 1 gives 90×90 features at output stride 8, as in the released model.
"""

from pathlib import Path

import torch
from torch import Tensor, nn

from .backbones import ResNet, load_backbone_weights, resnet
from .layers import ConvBnAct, LayerFn, check_input_size, check_num_classes, init_weights, scale_width, upsample_like
from .registry import register_model


class PyramidPooling(nn.Module):
    """Pool to each bin size, reduce with a 1×1 ConvBnAct, upsample back and concatenate with the input."""

    def __init__(self, in_channels: int, bins: tuple[int, ...] = (1, 2, 3, 6), **kw):
        super().__init__()
        branch_channels = in_channels // len(bins)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), ConvBnAct(in_channels, branch_channels, 1, **kw)) for b in bins
        )
        self.out_channels = in_channels + branch_channels * len(bins)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x] + [upsample_like(branch(x), x) for branch in self.branches], dim=1)


def seg_head(in_channels: int, mid_channels: int, num_classes: int, dropout: float = 0.1, **kw) -> nn.Sequential:
    """3×3 ConvBnAct → Dropout2d → 1×1 classifier (PSPNet's main and auxiliary heads)."""
    return nn.Sequential(
        ConvBnAct(in_channels, mid_channels, 3, **kw),
        nn.Dropout2d(dropout),
        nn.Conv2d(mid_channels, num_classes, 1),
    )


class PSPNet(nn.Module):
    """PSPNet on a backbone publishing ``out_channels`` and ``output_stride``, whose last two features feed the
    auxiliary head (layer3) and the pyramid pooling (layer4)."""

    needs_divisible_input = 1  # any size (e.g. the paper's 713×713): every feature is resized to the one it joins
    exportable = True

    def __init__(
        self,
        backbone: nn.Module,
        *,
        num_classes: int,
        width: float = 1.0,
        aux_head: bool = True,
        aux_channels: int = 256,
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: LayerFn = nn.ReLU,
    ):
        super().__init__()
        kw = dict(norm_layer=norm_layer, act_layer=act_layer)
        self.num_classes = check_num_classes(num_classes)
        self.backbone = backbone
        c3, c4 = backbone.out_channels[-2:]
        self.ppm = PyramidPooling(c4, **kw)
        self.head = seg_head(self.ppm.out_channels, scale_width(512, width), num_classes, **kw)
        self.aux_head = seg_head(c3, scale_width(aux_channels, width), num_classes, **kw) if aux_head else None
        init_weights(self)

    @property
    def use_aux(self) -> bool:
        """Whether training mode returns ``"aux"``."""
        return self.aux_head is not None

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        check_input_size(x, self.needs_divisible_input)
        feats = self.backbone(x)
        out = {"out": upsample_like(self.head(self.ppm(feats[-1])), x)}
        if self.training and self.aux_head is not None:
            out["aux"] = upsample_like(self.aux_head(feats[-2]), x)
        return out


def _create_pspnet(
    backbone: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    width: float = 1.0,
    norm_layer: LayerFn = nn.BatchNorm2d,
    act_layer: LayerFn = nn.ReLU,
    aux_head: bool = True,
    aux_channels: int = 256,
    output_stride: int = 8,
    backbone_weights: str | Path | None = None,
) -> PSPNet:
    kw = dict(norm_layer=norm_layer, act_layer=act_layer)
    encoder: ResNet = resnet(
        backbone, in_channels=in_channels, width=width, deep_stem=True, output_stride=output_stride, **kw
    )
    model = PSPNet(encoder, num_classes=num_classes, width=width, aux_head=aux_head, aux_channels=aux_channels, **kw)
    if backbone_weights is not None:
        load_backbone_weights(model.backbone, backbone_weights)
    return model


@register_model
def pspnet_resnet18(*, num_classes: int, **kwargs) -> PSPNet:
    return _create_pspnet("resnet18", num_classes=num_classes, **kwargs)


@register_model
def pspnet_resnet34(*, num_classes: int, **kwargs) -> PSPNet:
    return _create_pspnet("resnet34", num_classes=num_classes, **kwargs)


@register_model
def pspnet_resnet50(*, num_classes: int, **kwargs) -> PSPNet:
    return _create_pspnet("resnet50", num_classes=num_classes, **kwargs)


@register_model
def pspnet_resnet101(*, num_classes: int, **kwargs) -> PSPNet:
    return _create_pspnet("resnet101", num_classes=num_classes, **kwargs)


@register_model
def test_pspnet(*, num_classes: int, **kwargs) -> PSPNet:
    return _create_pspnet("resnet_tiny", num_classes=num_classes, **{"width": 1 / 32, **kwargs})
