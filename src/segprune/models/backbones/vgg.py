"""VGG-BN backbone (Simonyan & Zisserman, "Very Deep Convolutional Networks", ICLR 2015), with batch norm.

Five stages of 3×3 ConvBnAct (VGG16: 2, 2, 3, 3, 3 convs of 64, 128, 256, 512, 512 channels), each followed by a
2×2 max-pool. With ``return_indices=True`` the pools also return their argmax indices, which SegNet's decoder
reuses. No fully connected layers.

Pretrained weights: ``torchvision_keys`` maps stage ``s`` conv ``i`` to torchvision's ``vgg16_bn`` ``features.N``
(conv) and ``features.N+1`` (BN), counting three modules per conv (conv, BN, ReLU) and one per max-pool; the
``classifier`` is unused. torchvision's convs have a bias and ours do not: the loader folds it into the BN's running
mean, which is exact.
"""

from torch import Tensor, nn

from ..layers import ConvBnAct, LayerFn, scale_width
from .weights import KeyMap

VGG16_CHANNELS = (64, 128, 256, 512, 512)
VGG16_DEPTHS = (2, 2, 3, 3, 3)


class VGG(nn.Module):
    """VGG feature extractor.

    ``forward`` returns the five stage features before pooling, at strides 1, 2, 4, 8, 16; ``out_channels`` lists
    their channel counts. ``stages[i]`` and ``pools[i]`` are public so SegNet can drive the pools itself.
    """

    def __init__(
        self,
        *,
        channels: tuple[int, ...] = VGG16_CHANNELS,
        depths: tuple[int, ...] = VGG16_DEPTHS,
        in_channels: int = 3,
        width: float = 1.0,
        return_indices: bool = False,
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: LayerFn = nn.ReLU,
    ):
        super().__init__()
        kw = dict(norm_layer=norm_layer, act_layer=act_layer)
        self.return_indices = return_indices
        self.stages, self.pools, self.out_channels = nn.ModuleList(), nn.ModuleList(), []
        for c, depth in zip(channels, depths, strict=True):
            c = scale_width(c, width)
            convs = [ConvBnAct(in_channels if i == 0 else c, c, 3, **kw) for i in range(depth)]
            self.stages.append(nn.Sequential(*convs))
            self.pools.append(nn.MaxPool2d(2, stride=2, return_indices=return_indices))
            self.out_channels.append(c)
            in_channels = c

    def torchvision_keys(self) -> KeyMap:
        """Our layer names → torchvision's ``vgg16_bn`` names (see the module docstring)."""
        layers, index = {}, 0
        for s, stage in enumerate(self.stages):
            for i in range(len(stage)):
                layers[f"stages.{s}.{i}"] = (f"features.{index}", f"features.{index + 1}")
                index += 3  # conv, BN, ReLU
            index += 1  # max-pool
        return KeyMap(layers, unused=("classifier.",))

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = [self.stages[0](x)]
        # The last pool is SegNet's; a plain feature extractor stops at the deepest stage.
        for stage, pool in zip(self.stages[1:], self.pools[:-1], strict=True):
            pooled = pool(feats[-1])
            feats.append(stage(pooled[0] if self.return_indices else pooled))
        return feats


def vgg16_bn(**kwargs) -> VGG:
    """VGG16 with batch norm; ``kwargs`` go to ``VGG`` (``width``, ``return_indices``, ``depths``, ...)."""
    return VGG(**kwargs)
