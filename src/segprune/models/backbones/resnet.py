"""ResNet backbone (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016) for dense prediction.

Two options from the segmentation papers: the deep stem of PSPNet (three 3×3 convs, 64-64-128, instead of one 7×7)
and an output stride of 8 or 16, reached by replacing the stride of layer3 / layer4 with dilation (DeepLab, PSPNet).
Deviations: the stride of a bottleneck sits on its 3×3 conv (torchvision's "v1.5"), and the first block of a dilated
layer keeps the previous layer's dilation (torchvision's convention). There is no classifier (no ``fc``: 2.05 M
parameters at width 1 that ImageNet parameter counts include).

Pretrained weights: ``torchvision_keys`` maps every layer to torchvision's ``resnet*`` checkpoint keys (``conv1`` /
``bn1`` for the 7×7 stem; ``layerL.B.convK`` / ``layerL.B.bnK``; ``layerL.B.downsample.0`` / ``.1``; ``fc`` unused).
The deep stem has no torchvision counterpart, and neither have the first block's ``conv1`` and shortcut, whose input
is the deep stem's 128 channels instead of 64: those five layers keep their initialisation (and the file's
``conv1``, ``bn1`` and those two layers go unused). Dilation changes no weight, so any output stride loads.
"""

from torch import Tensor, nn

from ..layers import ConvBnAct, LayerFn, scale_width
from .weights import KeyMap


class BasicBlock(nn.Module):
    """Two 3×3 convs and a shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: LayerFn = nn.ReLU,
    ):
        super().__init__()
        self.conv1 = ConvBnAct(
            in_channels, planes, 3, stride=stride, dilation=dilation, norm_layer=norm_layer, act_layer=act_layer
        )
        self.conv2 = ConvBnAct(planes, planes, 3, dilation=dilation, norm_layer=norm_layer, act_layer=None)
        self.downsample = downsample
        self.act = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act(self.conv2(self.conv1(x)) + shortcut)


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (strided or dilated), 1×1 expand ×4, and a shortcut (ResNet-50/101)."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: LayerFn = nn.ReLU,
    ):
        super().__init__()
        kw = dict(norm_layer=norm_layer, act_layer=act_layer)
        self.conv1 = ConvBnAct(in_channels, planes, 1, **kw)
        self.conv2 = ConvBnAct(planes, planes, 3, stride=stride, dilation=dilation, **kw)
        self.conv3 = ConvBnAct(planes, planes * self.expansion, 1, norm_layer=norm_layer, act_layer=None)
        self.downsample = downsample
        self.act = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act(self.conv3(self.conv2(self.conv1(x))) + shortcut)


def _layer_strides(output_stride: int) -> tuple[list[int], list[int]]:
    """Per-layer (stride, dilation) for layer1..4; a stride that would pass ``output_stride`` becomes dilation."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    strides, dilations, total, dilation = [], [], 4, 1  # the stem and max-pool already reduce by 4
    for s in (1, 2, 2, 2):
        if total * s > output_stride:
            dilation, s = dilation * s, 1
        total *= s
        strides.append(s)
        dilations.append(dilation)
    return strides, dilations


def _make_stem(in_channels: int, width: float, deep: bool, **kw) -> nn.Sequential:
    c = scale_width(64, width)
    if not deep:
        return nn.Sequential(ConvBnAct(in_channels, c, 7, stride=2, **kw))
    return nn.Sequential(
        ConvBnAct(in_channels, c, 3, stride=2, **kw),
        ConvBnAct(c, c, 3, **kw),
        ConvBnAct(c, scale_width(128, width), 3, **kw),
    )


def _make_layer(
    block, in_channels: int, planes: int, blocks: int, *, stride: int, dilation: int, first_dilation: int, **kw
) -> nn.Sequential:
    out_channels = planes * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = ConvBnAct(in_channels, out_channels, 1, stride=stride, norm_layer=kw["norm_layer"], act_layer=None)
    layers = [block(in_channels, planes, stride=stride, dilation=first_dilation, downsample=downsample, **kw)]
    layers += [block(out_channels, planes, dilation=dilation, **kw) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """ResNet feature extractor.

    ``forward`` returns the five stage features [stem, layer1, layer2, layer3, layer4] at nominal strides
    2, 4, 8, 16, 32 (less where dilation replaced stride). ``out_channels`` (their channel counts) and
    ``output_stride`` describe the backbone as built, for heads to size themselves; ``forward`` never reads them.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        *,
        in_channels: int = 3,
        width: float = 1.0,
        deep_stem: bool = False,
        output_stride: int = 32,
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: LayerFn = nn.ReLU,
    ):
        super().__init__()
        self.output_stride = output_stride
        kw = dict(norm_layer=norm_layer, act_layer=act_layer)
        self.stem = _make_stem(in_channels, width, deep_stem, **kw)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.out_channels = [self.stem[-1].conv.out_channels]
        strides, dilations = _layer_strides(output_stride)
        first_dilation = 1
        for i, (blocks, stride, dilation) in enumerate(zip(layers, strides, dilations, strict=True)):
            planes = scale_width(64 * 2**i, width)
            layer = _make_layer(
                block,
                self.out_channels[-1],
                planes,
                blocks,
                stride=stride,
                dilation=dilation,
                first_dilation=first_dilation,
                **kw,
            )
            self.add_module(f"layer{i + 1}", layer)
            self.out_channels.append(planes * block.expansion)
            first_dilation = dilation

    def torchvision_keys(self) -> KeyMap:
        """Our layer names → torchvision's ``resnet*`` names (see the module docstring)."""
        layers, no_counterpart, unused = {}, [], ["fc."]
        if len(self.stem) == 1:
            layers["stem.0"] = ("conv1", "bn1")
        else:
            no_counterpart = [f"stem.{i}" for i in range(len(self.stem))] + ["layer1.0.conv1", "layer1.0.downsample"]
            unused += ["conv1.", "bn1.", "layer1.0.conv1.", "layer1.0.bn1.", "layer1.0.downsample."]
        for name, module in self.named_modules():
            if isinstance(module, ConvBnAct) and name.startswith("layer") and name not in no_counterpart:
                block, conv = name.rsplit(".", 1)  # "layer1.0", "conv2" or "downsample"
                layers[name] = (f"{name}.0", f"{name}.1") if conv == "downsample" else (name, f"{block}.bn{conv[-1]}")
        return KeyMap(layers, tuple(no_counterpart), tuple(unused))

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        c1 = self.layer1(self.maxpool(x))
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        return [x, c1, c2, c3, self.layer4(c3)]


# Block type and blocks per layer; "resnet_tiny" keeps every structural feature (bottleneck, projection and identity
# shortcuts, dilation in layer3 and layer4) in as few blocks as possible, for the test_* models.
RESNET_CONFIGS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet_tiny": (Bottleneck, (1, 1, 2, 2)),
}


def resnet(name: str, **kwargs) -> ResNet:
    """Build a ResNet by name.

    Args:
        name: a key of ``RESNET_CONFIGS`` ("resnet18" ... "resnet101", "resnet_tiny").
        **kwargs: passed to ``ResNet`` (``width``, ``deep_stem``, ``output_stride``, ...).
    """
    if name not in RESNET_CONFIGS:
        raise ValueError(f"unknown ResNet {name!r}; choose from {sorted(RESNET_CONFIGS)}")
    block, layers = RESNET_CONFIGS[name]
    return ResNet(block, layers, **kwargs)
