"""MobileNetV2 backbone (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018).

Inverted residual blocks (1×1 expand, 3×3 depthwise, linear 1×1 project) from Table 2 of the paper, without the
final 1×1 conv to 1280 and the classifier, as DeepLabV3+ uses it. ``output_stride`` 8 or 16 replaces the stride of
the later blocks with dilation of their depthwise conv (the dilated block itself takes the new rate, as
torchvision's dilated MobileNetV3). Deviation: the activation is ``act_layer`` (ReLU by default); pass
``act_layer=nn.ReLU6`` for the paper's.

Pretrained weights: ``torchvision_keys`` maps the stem and the 17 blocks, in order, to torchvision's
``mobilenet_v2`` ``features.0`` ... ``features.17`` (a ConvBnAct ``k`` of a block is ``conv.k.0`` / ``conv.k.1``, the
linear projection ``conv.k`` / ``conv.k+1``); the final 1×1 conv to 1280 (``features.18``) and the ``classifier``
are unused. Those weights were trained with ReLU6: build with ``act_layer=nn.ReLU6`` to use them as trained.
"""

from torch import Tensor, nn

from ..layers import ConvBnAct, LayerFn, run_stages, scale_width
from .weights import KeyMap

# (expansion t, channels c, blocks n, stride s) per block group, Table 2 of the paper.
MOBILENETV2_CONFIG = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """1×1 expand (skipped when t = 1), 3×3 depthwise, linear 1×1 project; residual when shapes allow."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        expand_ratio: int = 6,
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: LayerFn = nn.ReLU,
    ):
        super().__init__()
        kw = dict(norm_layer=norm_layer, act_layer=act_layer)
        hidden = in_channels * expand_ratio
        layers = [ConvBnAct(in_channels, hidden, 1, **kw)] if expand_ratio != 1 else []
        layers += [
            ConvBnAct(hidden, hidden, 3, stride=stride, dilation=dilation, groups=hidden, **kw),
            ConvBnAct(hidden, out_channels, 1, norm_layer=norm_layer, act_layer=None),
        ]
        self.conv = nn.Sequential(*layers)
        # A structural flag fixed at construction: pruning keeps in and out coupled, so it stays true.
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 feature extractor.

    ``forward`` returns five stage features at nominal strides 2, 4, 8, 16, 32 (channels 16, 24, 32, 96, 320 at
    width 1). ``out_channels`` and ``output_stride`` describe the backbone as built, for heads to size themselves.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        width: float = 1.0,
        output_stride: int = 32,
        config: tuple[tuple[int, int, int, int], ...] = MOBILENETV2_CONFIG,
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: LayerFn = nn.ReLU,
    ):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.output_stride = output_stride
        kw = dict(norm_layer=norm_layer, act_layer=act_layer)
        c_in = scale_width(32, width)
        stages: list[list[nn.Module]] = [[ConvBnAct(in_channels, c_in, 3, stride=2, **kw)]]
        self.out_channels = [c_in]
        total, dilation = 2, 1
        for t, c, n, s in config:
            c = scale_width(c, width)
            if s == 2:
                # A new feature stage at every nominal downsampling, dilated or not, so there are always five.
                stages.append([])
                self.out_channels.append(c_in)
                if total >= output_stride:
                    dilation, s = dilation * 2, 1
                total *= s
            for i in range(n):
                stages[-1].append(
                    InvertedResidual(c_in, c, stride=s if i == 0 else 1, dilation=dilation, expand_ratio=t, **kw)
                )
                c_in = c
            self.out_channels[-1] = c
        self.stages = nn.ModuleList(nn.Sequential(*blocks) for blocks in stages)

    def torchvision_keys(self) -> KeyMap:
        """Our layer names → torchvision's ``mobilenet_v2`` names (see the module docstring)."""
        layers = {}
        blocks = [(f"stages.{s}.{b}", block) for s, stage in enumerate(self.stages) for b, block in enumerate(stage)]
        for index, (name, block) in enumerate(blocks):
            feature = f"features.{index}"
            if isinstance(block, ConvBnAct):
                layers[name] = (f"{feature}.0", f"{feature}.1")
                continue
            last = len(block.conv) - 1  # the linear projection: a bare conv and norm in torchvision
            for k in range(len(block.conv)):
                conv, norm = (f"{k}", f"{k + 1}") if k == last else (f"{k}.0", f"{k}.1")
                layers[f"{name}.conv.{k}"] = (f"{feature}.conv.{conv}", f"{feature}.conv.{norm}")
        return KeyMap(layers, unused=("classifier.", f"features.{len(blocks)}."))

    def forward(self, x: Tensor) -> list[Tensor]:
        return run_stages(self.stages, x)


def mobilenetv2(**kwargs) -> MobileNetV2:
    """MobileNetV2; ``kwargs`` go to ``MobileNetV2`` (``width``, ``output_stride``, ...)."""
    return MobileNetV2(**kwargs)
