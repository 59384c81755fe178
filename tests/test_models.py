"""Contract tests for every tiny model, the registry, and backbone weight loading."""

import pytest
import torch
from safetensors.torch import save_file

from segprune.models import create_model, list_models, register_model

TINY = list_models("test_*")
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


def test_unknown_model_names_close_matches():
    with pytest.raises(ValueError, match="pspnet_resnet50"):
        create_model("pspnet_resnet5", num_classes=5)


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
