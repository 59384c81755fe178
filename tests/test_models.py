"""Contract tests for every tiny model, the registry, bad input, full-size sizes, and backbone weight loading."""

import warnings

import pytest
import torch
from safetensors.torch import save_file

import segprune
from segprune.models import create_model, list_models, register_model
from segprune.models.backbones import load_backbone_weights, mobilenetv2, resnet, translate_state_dict, vgg16_bn
from segprune.prune.oracle import masked_copy, outputs, relative_error
from tests.conftest import randomize_norms

TINY = [n for n in list_models("test_*") if n != "test_yolact"]  # detection outputs: see tests/test_yolact.py
ENTRY_POINTS = [
    "pspnet_resnet18", "pspnet_resnet34", "pspnet_resnet50", "pspnet_resnet101", "segnet_vgg16_bn", "unet",
    "icnet_resnet50", "deeplabv3plus_resnet50", "deeplabv3plus_resnet101", "deeplabv3plus_mobilenetv2",
    "test_pspnet", "test_segnet", "test_unet", "test_icnet", "test_deeplabv3plus",
]  # fmt: skip


def _build(name, **kwargs):
    torch.manual_seed(0)
    return create_model(name, num_classes=5, **kwargs)


def _aux_list(out):
    aux = out["aux"]
    return aux if isinstance(aux, list) else [aux]


def test_every_entry_point_is_registered():
    assert set(ENTRY_POINTS) <= set(list_models())
    assert list_models("pspnet_*") == ["pspnet_resnet101", "pspnet_resnet18", "pspnet_resnet34", "pspnet_resnet50"]


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_contract(name):
    model = _build(name)
    assert model.num_classes == 5 and model.exportable is True
    assert 64 % model.needs_divisible_input == 0
    assert sum(p.numel() for p in model.parameters()) <= 100_000
    x = torch.randn(2, 3, 64, 64)

    with torch.no_grad():
        out = model.eval()(x)
    assert set(out) == {"out"} and out["out"].shape == (2, 5, 64, 64)

    out = model.train()(x)
    assert ("aux" in out) == model.use_aux
    loss = out["out"].square().mean()
    if model.use_aux:
        assert all(a.shape == (2, 5, 64, 64) for a in _aux_list(out))
        loss = loss + sum(a.square().mean() for a in _aux_list(out))
    loss.backward()
    # Every parameter takes part: a dead branch would still tie channels in the pruning graph.
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("test_pspnet", {"aux_head": False}),
        ("test_icnet", {"aux_head": False}),
        ("test_unet", {"upsample": "bilinear"}),
        ("test_deeplabv3plus", {"output_stride": 8, "separable": False}),
        ("test_pspnet", {"output_stride": 16, "in_channels": 1}),
    ],
)
def test_tiny_model_options(name, kwargs):
    model = _build(name, **kwargs).train()
    x = torch.randn(2, kwargs.get("in_channels", 3), 64, 64)
    out = model(x)
    assert out["out"].shape == (2, 5, 64, 64)
    expect_aux = kwargs.get("aux_head", model.use_aux)
    assert model.use_aux == expect_aux and ("aux" in out) == expect_aux


def test_segnet_restores_odd_input_size():
    # Non-divisible sizes still come back at input resolution because the unpool gets output_size.
    model = _build("test_segnet").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 72, 104))["out"].shape == (1, 5, 72, 104)


def test_duplicate_registration_raises():
    def unet(*, num_classes, **kwargs):
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="already registered"):
        register_model(unet)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("pspnet_resnet5", ["pspnet_resnet50"]),
        ("psp_net", ["pspnet_resnet50", "pspnet_resnet101"]),
        ("deeplab_mobilenet", ["deeplabv3plus_mobilenetv2"]),
        ("SegNet", ["segnet_vgg16_bn"]),
    ],
)
def test_unknown_model_names_close_matches(name, expected):
    with pytest.raises(ValueError, match="did you mean") as err:
        create_model(name, num_classes=5)
    assert all(repr(e) in str(err.value) for e in expected)
    assert "'deeplabv3plus_resnet101'" not in str(err.value) or "deeplab" in name  # close ones, not every name


def test_unknown_model_name_without_close_match_lists_all():
    with pytest.raises(ValueError, match="the registered models are") as err:
        create_model("xyz", num_classes=5)
    assert all(repr(n) in str(err.value) for n in ENTRY_POINTS)


def test_unknown_keyword_raises():
    with pytest.raises(TypeError):
        create_model("test_unet", num_classes=5, widht=0.5)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_backbone_weights_round_trip(tmp_path, suffix):
    source = _build("test_pspnet")
    path = tmp_path / f"backbone{suffix}"
    state = {k: v.contiguous() for k, v in source.backbone.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    torch.manual_seed(1)
    model = create_model("test_pspnet", num_classes=5, backbone_weights=path)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_backbone_weights_mismatch_is_explained(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in _build("test_icnet").backbone.state_dict().items()}, path)
    with pytest.raises(ValueError, match="shape mismatches"):
        create_model("test_pspnet", num_classes=5, width=0.1, backbone_weights=path)


# ------------------------------------------------------------------------------------------------- full-size sizes

# (entry point, num_classes, builder kwargs, our exact count, published count); benchmarks/model_sizes.py has MACs
# and the sources. PSPNet's published counts fit a 512-channel auxiliary head; our default (256) is checked too.
FULL_SIZE = [
    ("segnet_vgg16_bn", 11, {}, 29_441_419, 29.45e6),
    ("pspnet_resnet101", 19, {"aux_channels": 512}, 70_436_838, 70.44e6),
    ("pspnet_resnet50", 19, {"aux_channels": 512}, 51_444_710, 51.45e6),
    ("pspnet_resnet101", 19, {}, 68_072_166, 70.44e6),
    ("pspnet_resnet50", 19, {}, 49_080_038, 51.45e6),
]


@pytest.mark.parametrize(("name", "num_classes", "kwargs", "exact", "published"), FULL_SIZE)
def test_full_size_parameter_counts(name, num_classes, kwargs, exact, published):
    with torch.device("meta"):  # shapes only: a 68 M-parameter model in milliseconds
        model = create_model(name, num_classes=num_classes, **kwargs)
    count = sum(p.numel() for p in model.parameters())
    assert count == exact
    assert abs(count - published) / published < 0.05


# ------------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("num_classes", [0, -1, 2.5, True])
def test_num_classes_must_be_positive_int(name, num_classes):
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        create_model(name, num_classes=num_classes)


@pytest.mark.parametrize(
    ("name", "output_stride"),
    [("test_pspnet", 4), ("test_pspnet", 12), ("test_deeplabv3plus", 32), ("deeplabv3plus_resnet50", 64)],
)
def test_unsupported_output_stride_raises_at_build(name, output_stride):
    with torch.device("meta"), pytest.raises(ValueError, match=f"output_stride.*got {output_stride}"):
        create_model(name, num_classes=5, output_stride=output_stride)


@pytest.mark.parametrize("name", ["test_segnet", "test_unet", "test_icnet"])
def test_output_stride_is_unknown_where_fixed(name):
    with pytest.raises(TypeError, match="output_stride"):
        create_model(name, num_classes=5, output_stride=16)


@pytest.mark.parametrize("name", TINY)
def test_input_size_divisibility(name, monkeypatch):
    model = _build(name).eval()
    divisor = model.needs_divisible_input
    x = torch.randn(1, 3, 4 * 16 + 1, 4 * 16 + 3)  # odd: divisible by nothing but 1
    if divisor == 1:  # the flag claims any size works: it must
        with torch.no_grad():
            assert model(x)["out"].shape == (1, 5, 65, 67)
        return
    # The check runs first, before any layer: a model that computed anything would hit this.
    for child in model.children():
        monkeypatch.setattr(child, "forward", lambda *a: pytest.fail("forward ran before the size check"))
    with pytest.raises(ValueError, match=rf"65×67 is not divisible by {divisor}\b"):
        model(x)
    with pytest.raises(ValueError, match=rf"64×{divisor * 5 - 8} is not divisible by {divisor}\b"):
        model(torch.randn(1, 3, 64, divisor * 5 - 8))


# ------------------------------------------------------------------------------ torchvision-layout backbone weights
# Key layouts of torchvision's ImageNet checkpoints as {key: shape}, written from torchvision's model code (resnet.py,
# vgg.py, mobilenetv2.py), not from our key maps, so a wrong map fails. ``base`` scales the channels the way our
# ``width`` does (base 8 ↔ width 1/8), for small files.

NORM_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _conv_norm(conv, norm, cout, cin, k, bias=False):
    shapes = {f"{conv}.weight": (cout, cin, k, k)} | ({f"{conv}.bias": (cout,)} if bias else {})
    return shapes | {f"{norm}.{key}": () if key == "num_batches_tracked" else (cout,) for key in NORM_KEYS}


def tv_resnet(bottleneck, layers, base=64):
    expansion, cin = (4 if bottleneck else 1), base
    shapes = _conv_norm("conv1", "bn1", base, 3, 7)
    for i, blocks in enumerate(layers):
        planes = base * 2**i
        for b in range(blocks):
            p = f"layer{i + 1}.{b}"
            if bottleneck:  # (out, in, kernel) of conv1, conv2, conv3
                convs = [(planes, cin, 1), (planes, planes, 3), (planes * 4, planes, 1)]
            else:
                convs = [(planes, cin, 3), (planes, planes, 3)]
            for k, (co, ci, size) in enumerate(convs, 1):
                shapes |= _conv_norm(f"{p}.conv{k}", f"{p}.bn{k}", co, ci, size)
            if b == 0 and (i > 0 or cin != planes * expansion):  # stride 2, or a width change
                shapes |= _conv_norm(f"{p}.downsample.0", f"{p}.downsample.1", planes * expansion, cin, 1)
            cin = planes * expansion
    return shapes | {"fc.weight": (1000, cin), "fc.bias": (1000,)}


def tv_vgg16_bn(base=64, hidden=4096):
    shapes, index, cin = {}, 0, 3
    for c, depth in zip((base, base * 2, base * 4, base * 8, base * 8), (2, 2, 3, 3, 3)):
        for _ in range(depth):
            shapes |= _conv_norm(f"features.{index}", f"features.{index + 1}", c, cin, 3, bias=True)
            index, cin = index + 3, c
        index += 1  # "M"
    for i, (out, inp) in {0: (hidden, cin * 7 * 7), 3: (hidden, hidden), 6: (1000, hidden)}.items():
        shapes |= {f"classifier.{i}.weight": (out, inp), f"classifier.{i}.bias": (out,)}
    return shapes


def tv_mobilenet_v2():
    setting = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]  # t, c, n
    shapes, cin, index = _conv_norm("features.0.0", "features.0.1", 32, 3, 3), 32, 1
    for t, c, n in setting:
        for _ in range(n):
            f, hidden, k = f"features.{index}.conv", cin * t, int(t != 1)
            if t != 1:
                shapes |= _conv_norm(f"{f}.0.0", f"{f}.0.1", hidden, cin, 1)
            shapes |= _conv_norm(f"{f}.{k}.0", f"{f}.{k}.1", hidden, 1, 3)  # depthwise
            shapes |= _conv_norm(f"{f}.{k + 1}", f"{f}.{k + 2}", c, hidden, 1)  # linear projection
            cin, index = c, index + 1
    shapes |= _conv_norm(f"features.{index}.0", f"features.{index}.1", 1280, cin, 1)
    return shapes | {"classifier.1.weight": (1000, 1280), "classifier.1.bias": (1000,)}


def _tensors(shapes, device="cpu", seed=0):
    """Random tensors of those shapes (positive variances, counters at 7), or empty ones on the meta device."""
    g = torch.Generator().manual_seed(seed)

    def make(key, shape):
        if device == "meta":
            return torch.empty(shape, device="meta")
        if key.endswith("num_batches_tracked"):
            return torch.tensor(7)
        return torch.rand(shape, generator=g) + 0.5 if key.endswith("running_var") else torch.randn(shape, generator=g)

    return {k: make(k, s) for k, s in shapes.items()}


def _backbone(name, device="cpu", **kwargs):
    with torch.device(device):
        torch.manual_seed(0)
        if name == "vgg16_bn":
            return vgg16_bn(**kwargs)
        return mobilenetv2(**kwargs) if name == "mobilenetv2" else resnet(name, **kwargs)


@pytest.mark.parametrize(
    ("name", "layout", "unused"),
    [
        ("resnet18", tv_resnet(False, (2, 2, 2, 2)), ("fc.",)),
        ("resnet34", tv_resnet(False, (3, 4, 6, 3)), ("fc.",)),
        ("resnet50", tv_resnet(True, (3, 4, 6, 3)), ("fc.",)),
        ("resnet101", tv_resnet(True, (3, 4, 23, 3)), ("fc.",)),
        ("vgg16_bn", tv_vgg16_bn(), ("classifier.",)),
        ("mobilenetv2", tv_mobilenet_v2(), ("classifier.", "features.18.")),
    ],
)
def test_torchvision_layout_fits_full_size(name, layout, unused):
    # On the meta device: every key and shape of the real checkpoint, nothing allocated.
    backbone = _backbone(name, "meta", output_stride=8) if name.startswith("resnet") else _backbone(name, "meta")
    state, report = translate_state_dict(backbone, _tensors(layout, "meta"))
    assert report.layout == "torchvision" and report.left_at_init == []
    assert set(report.loaded) == set(backbone.state_dict())
    assert report.ignored == sorted(k for k in layout if k.startswith(unused))
    assert len(report.folded_biases) == (13 if name == "vgg16_bn" else 0)


def test_torchvision_layout_into_deep_stem_reports_what_it_leaves():
    backbone = _backbone("resnet50", "meta", deep_stem=True, output_stride=8)
    _, report = translate_state_dict(backbone, _tensors(tv_resnet(True, (3, 4, 6, 3)), "meta"))
    assert report.left_at_init == ["layer1.0.conv1", "layer1.0.downsample", "stem.0", "stem.1", "stem.2"]
    assert {"conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer1.0.downsample.0.weight"} <= set(
        report.ignored
    )
    assert len(report.loaded) == len(backbone.state_dict()) - 5 * 6  # five conv + norm layers, six keys each


@pytest.mark.parametrize("drop_counters", [False, True])  # torchvision's older checkpoints have no counters
def test_torchvision_resnet_checkpoint_loads(tmp_path, drop_counters):
    layout = tv_resnet(True, (3, 4, 6, 3), base=8)
    file = _tensors(layout)
    if drop_counters:
        file = {k: v for k, v in file.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet50.pth"
    torch.save(file, path)
    model = create_model("deeplabv3plus_resnet50", num_classes=5, width=1 / 8, backbone_weights=path)
    own = model.backbone.state_dict()
    assert torch.equal(own["stem.0.conv.weight"], file["conv1.weight"])
    assert torch.equal(own["layer1.0.downsample.bn.running_var"], file["layer1.0.downsample.1.running_var"])
    assert torch.equal(own["layer4.2.conv3.conv.weight"], file["layer4.2.conv3.weight"])
    assert torch.equal(own["layer3.5.conv2.bn.bias"], file["layer3.5.bn2.bias"])
    assert int(own["layer2.0.conv1.bn.num_batches_tracked"]) == (0 if drop_counters else 7)


def test_torchvision_vgg_bias_folds_exactly(tmp_path):
    file = _tensors(tv_vgg16_bn(base=4, hidden=8))
    path = tmp_path / "vgg16_bn.safetensors"
    save_file(file, path)
    model = create_model("segnet_vgg16_bn", num_classes=5, width=1 / 16, backbone_weights=path)
    # torchvision's conv (with bias) + BN, rebuilt from the file, against our bias-free ConvBnAct.
    conv, bn = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
    conv.load_state_dict({k: file[f"features.3.{k}"] for k in ("weight", "bias")})
    bn.load_state_dict({k: file[f"features.4.{k}"] for k in NORM_KEYS})
    ours = model.encoder.stages[0][1]
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        assert torch.allclose(torch.relu(bn.eval()(conv(x))), ours.eval()(x), atol=1e-5)
        assert torch.allclose(bn.train()(conv(x)), ours.bn.train()(ours.conv(x)), atol=1e-5)  # batch stats too


def test_torchvision_mobilenet_v2_checkpoint_loads_full_size(tmp_path):
    file = _tensors(tv_mobilenet_v2())
    torch.save(file, tmp_path / "mobilenet_v2.pth")
    model = create_model("deeplabv3plus_mobilenetv2", num_classes=5, backbone_weights=tmp_path / "mobilenet_v2.pth")
    own = model.backbone.state_dict()
    assert torch.equal(own["stages.0.0.conv.weight"], file["features.0.0.weight"])
    assert torch.equal(own["stages.0.1.conv.1.bn.weight"], file["features.1.conv.2.weight"])  # t = 1: no expand
    assert torch.equal(own["stages.4.2.conv.1.conv.weight"], file["features.16.conv.1.0.weight"])  # depthwise
    assert torch.equal(own["stages.4.3.conv.2.bn.running_mean"], file["features.17.conv.3.running_mean"])


def test_torchvision_weights_into_deep_stem_warn_and_keep_init(tmp_path):
    # test_pspnet at width 1/16 is a deep-stem ResNet with blocks (1, 1, 2, 2) and base width 4.
    file = _tensors(tv_resnet(True, (1, 1, 2, 2), base=4))
    torch.save(file, tmp_path / "tiny.pth")
    fresh = _build("test_pspnet", width=1 / 16).backbone.state_dict()
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"5 layers .* keep their initialisation: layer1\.0\.conv1, .*stem\.2"):
        model = create_model("test_pspnet", num_classes=5, width=1 / 16, backbone_weights=tmp_path / "tiny.pth")
    own = model.backbone.state_dict()
    assert torch.equal(own["stem.1.conv.weight"], fresh["stem.1.conv.weight"])
    assert torch.equal(own["layer1.0.conv1.conv.weight"], fresh["layer1.0.conv1.conv.weight"])
    assert torch.equal(own["layer1.0.conv2.conv.weight"], file["layer1.0.conv2.weight"])
    assert torch.equal(own["layer4.1.conv3.bn.running_mean"], file["layer4.1.bn3.running_mean"])


def _load_error(tmp_path, file, backbone="resnet18"):
    torch.save(file, tmp_path / "weights.pth")
    with pytest.raises(ValueError) as err:
        load_backbone_weights(_backbone(backbone, width=1 / 8), tmp_path / "weights.pth")
    return str(err.value)


def test_missing_weights_file_raises(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        create_model("test_pspnet", num_classes=5, backbone_weights=tmp_path / "nowhere.pth")


def test_unreadable_weights_file_raises(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        load_backbone_weights(_backbone("resnet18"), tmp_path / "junk.pth")
    assert "flat state dict" in _load_error(tmp_path, {"state_dict": {"conv1.weight": torch.zeros(1)}})


def test_torchvision_missing_and_unexpected_keys_are_listed(tmp_path):
    file = _tensors(tv_resnet(False, (2, 2, 2, 2), base=8))
    del file["layer2.1.conv2.weight"], file["layer3.0.bn1.running_var"]
    file["layer5.0.conv1.weight"] = torch.zeros(1)
    message = _load_error(tmp_path, file)
    assert "2 missing keys: layer2.1.conv2.weight, layer3.0.bn1.running_var" in message
    assert "1 unexpected keys: layer5.0.conv1.weight" in message


def test_torchvision_wrong_architecture_is_explained(tmp_path):
    message = _load_error(tmp_path, _tensors(tv_resnet(True, (3, 4, 6, 3), base=8)))  # resnet50 into resnet18
    assert "unexpected keys: layer1.0.bn3.bias" in message and "shape mismatches: layer1.0.conv1.weight" in message
    message = _load_error(tmp_path, _tensors(tv_resnet(False, (2, 2, 2, 2), base=16)))  # another width
    assert "shape mismatches: bn1.bias: file (16,) vs model (8,)" in message


# ---------------------------------------------------------------------------------------------- full-size oracle

# One entry point per architecture, float64 at 1×3×64×64: about 8 s for all five on one idle core, and up to 45 s
# on two busy ones; marked slow so `-m "not slow"` leaves it out.
FULL_ORACLE = ["pspnet_resnet50", "segnet_vgg16_bn", "unet", "icnet_resnet50", "deeplabv3plus_mobilenetv2"]


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL_ORACLE)
def test_full_size_pruned_equals_masked(name):
    torch.manual_seed(0)
    model = randomize_norms(create_model(name, num_classes=3)).double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = segprune.channel_groups(model, x)
    result = segprune.prune(model, x, ratio=0.5, criterion="random", seed=0, groups=groups)
    assert result.channels_removed > 1000
    pruned = outputs(result.model, x)
    assert relative_error(outputs(masked_copy(model, groups, result.removed), x), pruned) < 1e-6
    assert relative_error(outputs(model, x), pruned) > 1e-6, "pruning changed nothing: the mask is not applied"
