"""SegNet (Badrinarayanan, Kendall & Cipolla, "SegNet: A Deep Convolutional Encoder-Decoder Architecture for Image
Segmentation", TPAMI 2017, arXiv:1511.00561).

The encoder is the 13 convolutions of VGG16-BN, each stage closed by a 2×2 max-pool that keeps its argmax indices.
The decoder mirrors it: each stage unpools with the indices of its encoder twin (``F.max_unpool2d``, to the
pre-pool size, so any input size ≥ 32 works), then 3×3 ConvBnAct layers, the last of which narrows to the next
stage's width; a 3×3 classifier conv (no norm, no activation) takes the place of the last decoder conv.
Deviation: convs carry no bias (BN follows each of them), which changes the parameter count by about 9 k.

Size with 11 classes (``benchmarks/model_sizes.py``): 29,441,419 parameters against the published 29.45 M (-0.03 %,
the missing biases), and 106.3 GMACs at 360×480 against ≈106.7 G (-0.4 %). 360 is not a multiple of 32: the
unpooling restores each size exactly, so SegNet takes any input size (``needs_divisible_input = 1``).
"""

from pathlib import Path

from torch import Tensor, nn
from torch.nn import functional as F

from .backbones import VGG, load_backbone_weights, vgg16_bn
from .backbones.vgg import VGG16_DEPTHS
from .layers import ConvBnAct, LayerFn, check_input_size, check_num_classes, init_weights
from .registry import register_model


def _decoder_stage(channels: int, out_channels: int | None, depth: int, **kw) -> nn.Sequential:
    """``depth`` convs mirroring one encoder stage; ``out_channels=None`` leaves the last one to the classifier."""
    convs = [ConvBnAct(channels, channels, 3, **kw) for _ in range(depth - 1)]
    if out_channels is not None:
        convs.append(ConvBnAct(channels, out_channels, 3, **kw))
    return nn.Sequential(*convs)


class SegNet(nn.Module):
    """SegNet on a VGG encoder built with ``return_indices=True``."""

    needs_divisible_input = 1  # any size: each unpool restores its encoder twin's exact size
    exportable = True
    use_aux = False

    def __init__(
        self,
        encoder: VGG,
        *,
        num_classes: int,
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: LayerFn = nn.ReLU,
    ):
        super().__init__()
        if not encoder.return_indices:
            raise ValueError("SegNet needs an encoder built with return_indices=True")
        kw = dict(norm_layer=norm_layer, act_layer=act_layer)
        self.num_classes = check_num_classes(num_classes)
        self.encoder = encoder
        chs, depths = encoder.out_channels, [len(stage) for stage in encoder.stages]
        # Deepest stage first, the order in which the decoder runs.
        self.decoder = nn.ModuleList(
            _decoder_stage(chs[i], chs[i - 1] if i else None, depths[i], **kw) for i in reversed(range(len(chs)))
        )
        self.classifier = nn.Conv2d(chs[0], num_classes, 3, padding=1)
        init_weights(self)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        check_input_size(x, self.needs_divisible_input)
        indices, sizes = [], []
        for stage, pool in zip(self.encoder.stages, self.encoder.pools, strict=True):
            x = stage(x)
            sizes.append(x.shape[-2:])
            x, idx = pool(x)
            indices.append(idx)
        for stage, idx, size in zip(self.decoder, reversed(indices), reversed(sizes), strict=True):
            x = stage(F.max_unpool2d(x, idx, kernel_size=2, stride=2, output_size=size))
        return {"out": self.classifier(x)}


def _create_segnet(
    *,
    num_classes: int,
    in_channels: int = 3,
    width: float = 1.0,
    norm_layer: LayerFn = nn.BatchNorm2d,
    act_layer: LayerFn = nn.ReLU,
    backbone_weights: str | Path | None = None,
    depths: tuple[int, ...] = VGG16_DEPTHS,
) -> SegNet:
    kw = dict(norm_layer=norm_layer, act_layer=act_layer)
    encoder = vgg16_bn(in_channels=in_channels, width=width, depths=depths, return_indices=True, **kw)
    model = SegNet(encoder, num_classes=num_classes, **kw)
    if backbone_weights is not None:
        load_backbone_weights(model.encoder, backbone_weights)
    return model


@register_model
def segnet_vgg16_bn(*, num_classes: int, **kwargs) -> SegNet:
    return _create_segnet(num_classes=num_classes, **kwargs)


@register_model
def test_segnet(*, num_classes: int, **kwargs) -> SegNet:
    return _create_segnet(num_classes=num_classes, **{"width": 1 / 16, "depths": (2, 2, 2, 2, 2), **kwargs})
