"""The oracle on segmentation models written the way other libraries write them, not the way segprune does.

The heads below copy torchvision's segmentation code in plain torch.nn (FCN, DeepLabV3 with ASPP and its
image-pooling branch, LR-ASPP with its sigmoid-gated scale branch): its module names, in-place ReLUs, one ReLU module
called three times per bottleneck, an ``IntermediateLayerGetter`` returning a dict of features, and dict outputs.
Channel counts are small, so each test takes a fraction of a second on an idle core. FCN returns ``"aux"`` in
training only (torchvision returns it in eval too); since the oracle compares eval outputs, the train-only branch is
also compared in training mode with norms and dropout frozen. Where torchvision is installed, its own LR-ASPP and FCN
run through the same oracle; it is no dependency of segprune, so usually those two tests skip.
"""

import importlib.util
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segprune
from segprune.prune.oracle import masked_copy, outputs, relative_error
from tests.conftest import randomize_norms

# ---------------------------------------------------------------------------------------------------- backbones


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (stride on the 3×3), with its single in-place ReLU module used three times."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """A ResNet trunk in torchvision's layout, layer3 and layer4 dilated (``replace_stride_with_dilation``), with the
    ImageNet ``avgpool`` / ``fc`` that ``IntermediateLayerGetter`` drops."""

    def __init__(self, base=4, blocks=(1, 1, 2, 1)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes, dilation = base, 1
        for i, (n, dilate) in enumerate(zip(blocks, (False, False, True, True))):
            planes, stride = base * 2**i, 1 if i == 0 else 2
            previous = dilation
            if dilate:
                dilation, stride = dilation * stride, 1
            downsample = None
            if stride != 1 or inplanes != planes * 4:
                downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                           nn.BatchNorm2d(planes * 4))  # fmt: skip
            layers = [Bottleneck(inplanes, planes, stride, previous, downsample)]
            layers += [Bottleneck(planes * 4, planes, dilation=dilation) for _ in range(1, n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
            inplanes = planes * 4
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, 10)
        self.channels = [base * 4 * 2**i for i in range(4)]


class IntermediateLayerGetter(nn.ModuleDict):
    """torchvision's: the model's children up to the last one asked for, run in order; returns the named outputs."""

    def __init__(self, model, return_layers):
        layers, remaining = OrderedDict(), set(return_layers)
        for name, module in model.named_children():
            layers[name] = module
            remaining.discard(name)
            if not remaining:
                break
        super().__init__(layers)
        self.return_layers = return_layers

    def forward(self, x):
        out = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: pool → fc1 → ReLU → fc2 → Hardsigmoid → scale the input."""

    def __init__(self, channels, squeeze):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.activation, self.scale_activation = nn.ReLU(), nn.Hardsigmoid()

    def forward(self, x):
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x))))) * x


def conv_norm_act(cin, cout, k=1, stride=1, groups=1, dilation=1, act=nn.Hardswish):
    """torchvision.ops.Conv2dNormActivation."""
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2 * dilation, dilation, groups, bias=False),
              nn.BatchNorm2d(cout)]  # fmt: skip
    return nn.Sequential(*layers, act(inplace=True)) if act else nn.Sequential(*layers)


class InvertedResidualV3(nn.Module):
    """MobileNetV3 block: expand, depthwise (strided or dilated), optional squeeze-excitation, linear projection."""

    def __init__(self, cin, expanded, cout, k, stride, dilation=1, se=False, act=nn.Hardswish):
        super().__init__()
        layers = [conv_norm_act(cin, expanded, act=act)] if expanded != cin else []
        layers.append(conv_norm_act(expanded, expanded, k, 1 if dilation > 1 else stride, expanded, dilation, act))
        if se:
            layers.append(SqueezeExcitation(expanded, max(8, expanded // 4)))
        layers.append(conv_norm_act(expanded, cout, act=None))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x):
        out = self.block(x)
        return out + x if self.use_res_connect else out


def tiny_mobilenet_v3():
    """A MobileNetV3-Large-like ``features``: stride-8 C2 at index 4, dilated last stage, final 1×1 to 6×."""
    return nn.Sequential(
        conv_norm_act(3, 8, 3, 2),
        InvertedResidualV3(8, 8, 8, 3, 1, act=nn.ReLU),
        InvertedResidualV3(8, 24, 12, 3, 2, act=nn.ReLU),
        InvertedResidualV3(12, 36, 12, 5, 2, se=True, act=nn.ReLU),
        InvertedResidualV3(12, 36, 12, 5, 1, se=True, act=nn.ReLU),  # C2, stride 8: LR-ASPP's "low"
        InvertedResidualV3(12, 48, 16, 3, 2),
        InvertedResidualV3(16, 64, 16, 3, 1, se=True),
        InvertedResidualV3(16, 96, 24, 5, 2, dilation=2, se=True),  # dilated: stays at stride 16
        conv_norm_act(24, 144),  # C5: LR-ASPP's "high"
    )


# -------------------------------------------------------------------------------------------------------- heads


class FCNHead(nn.Sequential):
    def __init__(self, in_channels, channels):
        inter = in_channels // 4
        super().__init__(nn.Conv2d(in_channels, inter, 3, padding=1, bias=False), nn.BatchNorm2d(inter), nn.ReLU(),
                         nn.Dropout(0.1), nn.Conv2d(inter, channels, 1))  # fmt: skip


class ASPPPooling(nn.Sequential):
    def __init__(self, in_channels, out_channels):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())  # fmt: skip

    def forward(self, x):
        size = x.shape[-2:]
        for mod in self:
            x = mod(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    def __init__(self, in_channels, rates, out_channels):
        super().__init__()
        modules = [nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
                                 nn.ReLU())]  # fmt: skip
        modules += [nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=r, dilation=r, bias=False),
                                  nn.BatchNorm2d(out_channels), nn.ReLU()) for r in rates]  # fmt: skip
        modules.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(modules)
        self.project = nn.Sequential(nn.Conv2d(len(self.convs) * out_channels, out_channels, 1, bias=False),
                                     nn.BatchNorm2d(out_channels), nn.ReLU(), nn.Dropout(0.5))  # fmt: skip

    def forward(self, x):
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class DeepLabHead(nn.Sequential):
    def __init__(self, in_channels, num_classes, channels=16):
        super().__init__(ASPP(in_channels, [12, 24, 36], channels),
                         nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.Conv2d(channels, num_classes, 1))  # fmt: skip


class LRASPPHead(nn.Module):
    def __init__(self, low_channels, high_channels, num_classes, inter_channels):
        super().__init__()
        self.cbr = nn.Sequential(nn.Conv2d(high_channels, inter_channels, 1, bias=False),
                                 nn.BatchNorm2d(inter_channels), nn.ReLU(inplace=True))  # fmt: skip
        self.scale = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(high_channels, inter_channels, 1, bias=False),
                                   nn.Sigmoid())  # fmt: skip
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter_channels, num_classes, 1)

    def forward(self, features):
        low, high = features["low"], features["high"]
        x = self.cbr(high) * self.scale(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.low_classifier(low) + self.high_classifier(x)


# ------------------------------------------------------------------------------------------------------- models


class SimpleSegmentationModel(nn.Module):
    """torchvision's ``_SimpleSegmentationModel`` (FCN, DeepLabV3), except that ``"aux"`` is returned in training
    only, the train-only branch the pruning engine has to find by tracing in both modes."""

    def __init__(self, backbone, classifier, aux_classifier=None):
        super().__init__()
        self.backbone, self.classifier, self.aux_classifier = backbone, classifier, aux_classifier

    def forward(self, x):
        size = x.shape[-2:]
        features = self.backbone(x)
        result = OrderedDict(out=F.interpolate(self.classifier(features["out"]), size=size, mode="bilinear",
                                               align_corners=False))  # fmt: skip
        if self.training and self.aux_classifier is not None:
            aux = self.aux_classifier(features["aux"])
            result["aux"] = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
        return result


class LRASPP(nn.Module):
    def __init__(self, backbone, low_channels, high_channels, num_classes, inter_channels=16):
        super().__init__()
        self.backbone = backbone
        self.classifier = LRASPPHead(low_channels, high_channels, num_classes, inter_channels)

    def forward(self, x):
        out = F.interpolate(self.classifier(self.backbone(x)), size=x.shape[-2:], mode="bilinear",
                            align_corners=False)  # fmt: skip
        return OrderedDict(out=out)


def fcn(num_classes=3):
    trunk = TinyResNet()
    backbone = IntermediateLayerGetter(trunk, {"layer4": "out", "layer3": "aux"})
    c3, c4 = trunk.channels[2:]
    return SimpleSegmentationModel(backbone, FCNHead(c4, num_classes), FCNHead(c3, num_classes))


def deeplabv3(num_classes=3):
    trunk = TinyResNet()
    backbone = IntermediateLayerGetter(trunk, {"layer4": "out"})
    return SimpleSegmentationModel(backbone, DeepLabHead(trunk.channels[-1], num_classes))


def lraspp(num_classes=3):
    features = tiny_mobilenet_v3()
    backbone = IntermediateLayerGetter(features, {"4": "low", "8": "high"})
    return LRASPP(backbone, 12, 144, num_classes)


MODELS = {"fcn": fcn, "deeplabv3": deeplabv3, "lraspp": lraspp}

# ------------------------------------------------------------------------------------------------------- oracle


def build(make) -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(make()).double().eval()


def example(size=32) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, size, size, dtype=torch.float64)  # two images: training-mode BN on 1×1 needs them


def prune(model, x, ratio, seed=0):
    """(pruned result, groups) with the random criterion."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = segprune.channel_groups(model, x)
    return segprune.prune(model, x, ratio=ratio, criterion="random", seed=seed, groups=groups), groups


def train_outputs(model, x) -> list[torch.Tensor]:
    """Outputs in training mode (train-only branches included) with norms and dropout frozen, so they compare."""
    model.train()
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.Dropout, nn.Dropout2d)):
            m.eval()
    with torch.no_grad():
        out = model(x)
    model.eval()
    return list(out.values()) if isinstance(out, dict) else [out]


def assert_exact(model, x, ratio):
    result, groups = prune(model, x, ratio, seed=int(ratio * 10))
    assert result.channels_removed > 0, "nothing was pruned: the test would prove nothing"
    masked = masked_copy(model, groups, result.removed)
    assert relative_error(outputs(masked, x), outputs(result.model, x)) < 1e-6
    assert relative_error(outputs(model, x), outputs(result.model, x)) > 1e-6, "the mask changed nothing"
    return result, masked


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_pruned_equals_masked(name, ratio):
    model, x = build(MODELS[name]), example()
    result, masked = assert_exact(model, x, ratio)
    if name == "fcn":  # the auxiliary head exists in training only
        pruned, reference = train_outputs(result.model, x), train_outputs(masked, x)
        assert len(pruned) == 2 and pruned[1].shape == (2, 3, 32, 32)
        assert relative_error(reference, pruned) < 1e-6


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ratio_zero_is_bit_identical(name):
    model, x = build(MODELS[name]), example()
    result, _ = prune(model, x, 0.0)
    assert result.channels_removed == 0
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, x), outputs(result.model, x), strict=True))


def test_lraspp_scale_gate_stays_coupled():
    # cbr(high) * scale(high): the gate's channels are the cbr's channels, so they must be cut together.
    model, x = build(lraspp), example()
    result, _ = assert_exact(model, x, 0.6)
    head = result.model.classifier
    assert head.cbr[0].out_channels == head.scale[1].out_channels == head.high_classifier.in_channels < 16


# ------------------------------------------------------------------------------------------- installed libraries


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (it is no dependency of segprune): its own models are not tested")


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "fcn_resnet50"])
def test_torchvision_segmentation_models(name):
    _require("torchvision")
    from torchvision.models import segmentation

    kwargs = {"aux_loss": True} if name == "fcn_resnet50" else {}
    model = build(lambda: getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=3, **kwargs))
    x = example(32)
    assert_exact(model, x, 0.3)
    result, _ = prune(model, x, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, x), outputs(result.model, x), strict=True))
