"""Other libraries' models in recipes and checkpoints (#23 item 6): builder specs, a local weights file, and the round
trip train -> prune -> save -> load -> predict / export on smp's and transformers' Segformer.

The round trips skip where the library is not installed (smp needs timm; transformers is in the test extra); the
spec, recipe and weights-file tests need neither.
"""

import importlib
import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from segprune import checkpoint
from segprune.cli import main
from segprune.models import create_model, library_model, register_builder
from segprune.workflows import recipe_from
from segprune.workflows.recipe import as_plain


def _importable(package: str) -> bool:
    try:
        importlib.import_module(package)
    except ImportError:  # absent, or present without what it needs (smp without torchvision)
        return False
    return True


HF, SMP = _importable("transformers"), _importable("segmentation_models_pytorch")
TINY = ["--set", "train_samples=8", "--set", "val_samples=4", "--set", "epochs=1", "--set", "size=[64,64]",
        "--set", "batch_size=4", "--set", "threads=1", "--quiet"]
HF_SEGFORMER = "{config: {hidden_sizes: [16, 32, 40, 64], num_attention_heads: [1, 2, 2, 4], depths: [1, 1, 1, 1], " \
               "decoder_hidden_size: 32}}"
SMP_SEGFORMER = "{encoder_name: mit_b0, decoder_segmentation_channels: 32}"


def test_an_unknown_builder_is_named_with_the_choices():
    with pytest.raises(ValueError, match=r"'nope:Segformer'.*smp.*timm.*transformers"):
        create_model("nope:Segformer", num_classes=3)


def test_a_builder_whose_library_is_missing_names_the_extra():
    register_builder("absent", lambda name, **kw: None, package="segprune_no_such_package", extra="absentlib")
    with pytest.raises(ValueError, match=r"segprune_no_such_package is not installed.*segprune\[absentlib\]"):
        create_model("absent:Thing", num_classes=3)


def test_recipe_takes_model_args_as_yaml_and_refuses_a_zoo_width_for_a_library_model():
    r = recipe_from(None, {"model": "smp:Segformer", "model_args": "{encoder_name: mit_b0}"})
    assert r.model_kwargs(5) == {"num_classes": 5, "encoder_name": "mit_b0"}  # the demo's width 0.25 is not passed
    assert recipe_from(None, as_plain(r)).model_kwargs(5) == r.model_kwargs(5)  # a step rereads its saved recipe
    with pytest.raises(ValueError, match="width scales segprune's zoo"):
        recipe_from(None, {"model": "smp:Segformer", "width": 0.5})
    with pytest.raises(ValueError, match=r"model_args=.*is not a mapping"):
        recipe_from(None, {"model_args": "[1, 2]"})


def test_weights_file_initialises_a_model_and_a_head_of_another_shape_stays_new(tmp_path):
    torch.manual_seed(0)
    source = create_model("test_pspnet", num_classes=4, width=0.03125)
    path = tmp_path / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    same = create_model("test_pspnet", num_classes=4, width=0.03125)
    assert checkpoint.load_pretrained(same, path) == (len(source.state_dict()), [])
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(same.eval()(x)["out"], source.eval()(x)["out"])
    other = create_model("test_pspnet", num_classes=7, width=0.03125)
    loaded, fresh = checkpoint.load_pretrained(other, path)
    assert fresh and all(other.state_dict()[k].shape != source.state_dict()[k].shape for k in fresh)
    assert loaded == len(source.state_dict()) - len(fresh)


def test_weights_file_of_another_architecture_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.stem.weight": torch.zeros(2, 3)}, str(path))
    model = create_model("test_pspnet", num_classes=4, width=0.03125)
    with pytest.raises(checkpoint.CheckpointError, match=r"other.safetensors does not fit .*encoder.stem.weight"):
        checkpoint.load_pretrained(model, path)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load_pretrained(model, tmp_path / "missing.safetensors")


def _round_trip(tmp_path, spec: str, args: str, weights_of):
    """train 1 epoch (from a local weights file) -> prune -> load -> predict and export: the same outputs."""
    torch.manual_seed(0)
    start = create_model(spec, num_classes=6, **recipe_from(None, {"model_args": args}).model_args)
    weights = tmp_path / "start.safetensors"
    save_file({k: v.contiguous() for k, v in weights_of(start).items()}, str(weights))
    run, pruned = tmp_path / "run", tmp_path / "pruned"
    assert main(["train", "--model", spec, "--out", str(run), "--set", f"model_args={args}",
                 "--set", f"weights={weights}", *TINY]) == 0
    assert main(["prune", str(run / "model"), "--method", "l1", "--ratio", "0.5", "--size", "64", "64",
                 "--out", str(pruned)]) == 0
    assert main(["finetune", str(pruned), "--out", str(tmp_path / "tuned"), "--set", "finetune_epochs=1",
                 "--quiet"]) == 0  # its saved recipe names the library model (no zoo width)
    config = checkpoint.load_config(pruned)
    assert config["model"] == spec and "pretrained" not in config["model_kwargs"]
    model, trained = checkpoint.load(pruned), checkpoint.load(run / "model")
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in trained.parameters())
    x = torch.randn(1, 3, 64, 64)
    out = model(x)["out"]
    assert out.shape == (1, 6, 64, 64)  # the library's output, adapted: full resolution
    torch.testing.assert_close(checkpoint.load(pruned)(x)["out"], out)  # rebuilt from the spec alone, same outputs
    image = tmp_path / "images" / "a.png"
    image.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    assert main(["predict", str(pruned), str(image.parent), "--out", str(tmp_path / "pred")]) == 0
    if importlib.util.find_spec("onnxruntime"):
        assert main(["export", str(pruned), "--onnx", str(tmp_path / "m.onnx"), "--input-size", "64", "64"]) == 0


@pytest.mark.skipif(not HF, reason="transformers is not installed (pip install 'segprune[zoo]')")
def test_transformers_segformer_round_trip(tmp_path):
    _round_trip(tmp_path, "transformers:SegformerForSemanticSegmentation", HF_SEGFORMER,
                lambda m: library_model(m).state_dict())


@pytest.mark.skipif(not HF, reason="transformers is not installed (pip install 'segprune[zoo]')")
def test_transformers_local_pretrained_folder_is_recorded_as_its_config(tmp_path):
    torch.manual_seed(0)
    args = recipe_from(None, {"model_args": HF_SEGFORMER}).model_args
    library_model(create_model("transformers:SegformerForSemanticSegmentation", num_classes=6, **args)) \
        .save_pretrained(tmp_path / "hf")
    spec = "transformers:SegformerForSemanticSegmentation"
    model = create_model(spec, num_classes=3, pretrained=str(tmp_path / "hf"))
    assert "pretrained" not in model.rebuild_kwargs and model.rebuild_kwargs["config"]["hidden_sizes"][0] == 16
    (tmp_path / "config.json").write_text(json.dumps(model.rebuild_kwargs["config"]))
    from_file = create_model(spec, num_classes=3, config=str(tmp_path / "config.json"))
    assert from_file.model.config.hidden_sizes == [16, 32, 40, 64]
    with pytest.raises(ValueError, match="not a local transformers model"):
        create_model(spec, num_classes=3, pretrained=str(tmp_path / "nothing"))
    again = create_model(spec, **model.rebuild_kwargs)
    assert again.model.config.num_labels == 3
    assert again.load_state_dict(model.state_dict()) is not None  # the same architecture, from the config alone


@pytest.mark.skipif(not SMP, reason="segmentation_models_pytorch is not installed (pip install 'segprune[zoo]')")
def test_smp_segformer_round_trip(tmp_path):
    _round_trip(tmp_path, "smp:Segformer", SMP_SEGFORMER, lambda m: library_model(m).state_dict())


@pytest.mark.skipif(not _importable("timm"), reason="timm is not installed (pip install 'segprune[zoo]')")
def test_timm_backbone_with_a_linear_head_prunes_exactly():
    import segprune

    torch.manual_seed(0)
    model = create_model("timm:resnet10t", num_classes=4).eval()
    x = torch.randn(1, 3, 64, 64)
    assert model(x)["out"].shape == (1, 4, 64, 64)
    result = segprune.prune(model, x, ratio=0.5, criterion="l1")
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in model.parameters())
    v = result.verification
    assert v.checked and v.error <= v.tolerance and not v.frozen
