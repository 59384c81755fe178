"""ICNet (Zhao et al., "ICNet for Real-Time Semantic Segmentation on High-Resolution Images", ECCV 2018,
arXiv:1704.08545).

Three branches share work as in the released model: the 1/2-resolution image runs through the stem, layer1 and layer2
of a dilated ResNet (output stride 8), giving a 1/16 feature; that feature, downsampled ×2, runs through layer3 and
layer4 with the same weights and a light pyramid pooling (the pooled bins 1, 2, 3, 6 are summed onto the input, no
convs) and a 1×1 ConvBnAct to 256 channels, giving the 1/32 feature; the full-resolution image runs through three
stride-2 3×3 ConvBnAct (32, 32, 64 channels), giving a 1/8 feature. Two cascade feature fusion units join them: the
low-resolution input is upsampled ×2 and goes through a 3×3 conv with dilation 2 + BN, the high-resolution one
through a 1×1 conv + BN, both to 128 channels; the sum goes through ReLU. Each unit also classifies its upsampled
low-resolution input (cascade label guidance): those 1/16 and 1/8 logits are ``"aux"`` in training.
Deviations: the final classifier runs at 1/8 and is upsampled ×8 in one step, which equals the paper's ×2, 1×1
classifier, ×4 (a 1×1 conv commutes with bilinear upsampling); the 1/4-resolution branch starts after layer2 rather
than after the first block of layer2 (the released model's ``conv3_1``); the cascade logits are upsampled to the
input size, so the trainer's loss sees the same shape for every output (the paper downsamples the labels instead).
"""

from pathlib import Path

from torch import Tensor, nn
from torch.nn import functional as F

from .backbones import ResNet, load_backbone_weights, resnet
from .layers import ConvBnAct, LayerFn, check_input_size, check_num_classes, init_weights, scale_width, upsample_like
from .registry import register_model


class SumPyramidPooling(nn.Module):
    """ICNet's light pyramid pooling: average-pool to each bin size, upsample back, add to the input."""

    def __init__(self, bins: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        self.pools = nn.ModuleList(nn.AdaptiveAvgPool2d(b) for b in bins)

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for pool in self.pools:
            out = out + upsample_like(pool(x), x)
        return out


class CascadeFeatureFusion(nn.Module):
    """Fuse a low-resolution feature into a ×2 higher-resolution one; optionally classify the low one."""

    def __init__(
        self,
        low_channels: int,
        high_channels: int,
        out_channels: int,
        *,
        num_classes: int,
        use_aux: bool = True,
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: LayerFn = nn.ReLU,
    ):
        super().__init__()
        self.low = ConvBnAct(low_channels, out_channels, 3, dilation=2, norm_layer=norm_layer, act_layer=None)
        self.high = ConvBnAct(high_channels, out_channels, 1, norm_layer=norm_layer, act_layer=None)
        self.act = act_layer()
        self.classifier = nn.Conv2d(low_channels, num_classes, 1) if use_aux else None

    def forward(self, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor | None]:
        low = upsample_like(low, high)
        out = self.act(self.low(low) + self.high(high))
        logits = self.classifier(low) if self.training and self.classifier is not None else None
        return out, logits


class ICNet(nn.Module):
    """ICNet on a dilated ResNet at output stride 8, whose stages it drives one by one: stem to layer2 on the
    1/2-resolution image, layer3 and layer4 on that result downsampled ×2."""

    needs_divisible_input = 1  # any size: every branch is resized to the one it joins
    exportable = True

    def __init__(
        self,
        backbone: ResNet,
        *,
        num_classes: int,
        in_channels: int = 3,
        width: float = 1.0,
        aux_head: bool = True,
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: LayerFn = nn.ReLU,
    ):
        super().__init__()
        if backbone.output_stride != 8:
            raise ValueError(f"ICNet needs a backbone at output stride 8, got {backbone.output_stride}")
        kw = dict(norm_layer=norm_layer, act_layer=act_layer)
        self.num_classes = check_num_classes(num_classes)
        self.backbone = backbone
        c32, c64, c128, c256 = (scale_width(c, width) for c in (32, 64, 128, 256))
        self.sub1 = nn.Sequential(
            ConvBnAct(in_channels, c32, 3, stride=2, **kw),
            ConvBnAct(c32, c32, 3, stride=2, **kw),
            ConvBnAct(c32, c64, 3, stride=2, **kw),
        )
        self.ppm = SumPyramidPooling()
        self.reduce = ConvBnAct(backbone.out_channels[-1], c256, 1, **kw)
        cff_kw = dict(num_classes=num_classes, use_aux=aux_head, **kw)
        self.cff_sub24 = CascadeFeatureFusion(c256, backbone.out_channels[2], c128, **cff_kw)
        self.cff_sub12 = CascadeFeatureFusion(c128, c64, c128, **cff_kw)
        self.classifier = nn.Conv2d(c128, num_classes, 1)
        init_weights(self)

    @property
    def use_aux(self) -> bool:
        """Whether training mode returns ``"aux"`` (the cascade logits)."""
        return self.cff_sub24.classifier is not None

    def forward(self, x: Tensor) -> dict[str, Tensor | list[Tensor]]:
        check_input_size(x, self.needs_divisible_input)
        b = self.backbone
        x2 = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        f16 = b.layer2(b.layer1(b.maxpool(b.stem(x2))))
        f32 = F.interpolate(f16, scale_factor=0.5, mode="bilinear", align_corners=False)
        f32 = self.reduce(self.ppm(b.layer4(b.layer3(f32))))
        y16, aux16 = self.cff_sub24(f32, f16)
        y8, aux8 = self.cff_sub12(y16, self.sub1(x))
        out = {"out": upsample_like(self.classifier(y8), x)}
        if self.training and self.use_aux:
            out["aux"] = [upsample_like(aux16, x), upsample_like(aux8, x)]
        return out


def _create_icnet(
    backbone: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    width: float = 1.0,
    norm_layer: LayerFn = nn.BatchNorm2d,
    act_layer: LayerFn = nn.ReLU,
    aux_head: bool = True,
    backbone_weights: str | Path | None = None,
) -> ICNet:
    kw = dict(norm_layer=norm_layer, act_layer=act_layer)
    encoder = resnet(backbone, in_channels=in_channels, width=width, deep_stem=True, output_stride=8, **kw)
    model = ICNet(encoder, num_classes=num_classes, in_channels=in_channels, width=width, aux_head=aux_head, **kw)
    if backbone_weights is not None:
        load_backbone_weights(model.backbone, backbone_weights)
    return model


@register_model
def icnet_resnet50(*, num_classes: int, **kwargs) -> ICNet:
    return _create_icnet("resnet50", num_classes=num_classes, **kwargs)


@register_model
def test_icnet(*, num_classes: int, **kwargs) -> ICNet:
    return _create_icnet("resnet_tiny", num_classes=num_classes, **{"width": 1 / 32, **kwargs})
