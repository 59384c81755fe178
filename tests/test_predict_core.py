"""The inference core of `segprune predict`: whole images at any size, tiles that cover every pixel and equal plain
inference for one tile, ONNX equal to eager, and masks / overlays written as images."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from segprune.data.base import IGNORE_INDEX
from segprune.eval.inference import OnnxModel, image_logits, predict_image, tile_stride, to_tensor
from segprune.models import create_model
from segprune.report import visual


def rgb(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("test_pspnet", num_classes=3).eval()


def test_one_tile_the_size_of_the_image_equals_plain_inference(model):
    image = rgb(32, 48)
    plain = image_logits(model, image)
    with torch.no_grad():
        direct = model(to_tensor(image))["out"][0]
    torch.testing.assert_close(plain, direct)
    torch.testing.assert_close(image_logits(model, image, tile=(32, 48)), plain)


def test_tiles_cover_every_pixel_and_average_overlaps():
    calls = []

    class Ones(nn.Module):
        def forward(self, x):
            calls.append(tuple(x.shape[-2:]))
            return torch.ones(x.shape[0], 2, *x.shape[-2:])

    logits = image_logits(Ones(), rgb(50, 70), tile=(32, 32), overlap=0.25)
    assert logits.shape == (2, 50, 70) and torch.equal(logits, torch.ones(2, 50, 70))  # no gap, overlaps averaged
    assert set(calls) == {(32, 32)} and len(calls) == 2 * 3  # rows at 0, 18; columns at 0, 24, 38
    assert tile_stride((32, 32), 0.25) == (24, 24)


def test_size_resizes_and_the_labels_come_back_at_the_image_size(model):
    labels = predict_image(model, rgb(45, 61), size=(32, 48))
    assert labels.shape == (45, 61) and labels.dtype == np.int64 and labels.max() < 3
    assert predict_image(model, rgb(31, 45)).shape == (31, 45)  # any size, whole


def test_onnx_equals_eager_and_a_fixed_size_file_is_resized(model, tmp_path):
    pytest.importorskip("onnxruntime")
    from segprune.export.onnx import export_onnx

    image = rgb(40, 56, seed=3)
    torch.manual_seed(0)
    unet = create_model("test_unet", num_classes=3).eval()  # dynamic H and W in ONNX; needs multiples of 16
    path = export_onnx(unet, torch.zeros(1, 3, 32, 48), tmp_path / "m.onnx", dynamic=True)["path"]
    onnx_model = OnnxModel(path, divisible=unet.needs_divisible_input)
    assert onnx_model.input_size is None
    torch.testing.assert_close(image_logits(onnx_model, image), image_logits(unet, image), atol=1e-4, rtol=1e-4)
    tiled = image_logits(onnx_model, image, tile=(32, 32))
    torch.testing.assert_close(tiled, image_logits(unet, image, tile=(32, 32)), atol=1e-4, rtol=1e-4)
    # PSPNet's pyramid pooling fixes the size in ONNX: the image is resized to it, as `size` does for eager
    fixed = export_onnx(model, torch.zeros(1, 3, 32, 48), tmp_path / "fixed.onnx")["path"]
    assert OnnxModel(fixed).input_size == (32, 48)
    torch.testing.assert_close(image_logits(fixed, image), image_logits(model, image, size=(32, 48)), atol=1e-4,
                               rtol=1e-4)
    with pytest.raises(ValueError, match="takes only 32x48 inputs"):
        image_logits(fixed, image, tile=(16, 16))


def test_mask_png_keeps_the_labels_and_shows_the_class_colours(tmp_path):
    labels = np.array([[0, 1, 2], [IGNORE_INDEX, 1, 0]])
    path = visual.save_mask_png(labels, tmp_path / "out" / "mask.png", num_classes=3)
    with Image.open(path) as saved:
        assert saved.mode == "P"
        assert np.array_equal(np.asarray(saved), labels)
        colours = np.asarray(saved.convert("RGB"))
    assert (colours[0, 1] == visual.class_colours(3)[1]).all() and (colours[1, 0] == 0).all()
    camvid = [(128, 128, 128), (128, 0, 0), (192, 192, 128)]
    assert (visual.colour_mask(labels, 3, palette=camvid)[0, 2] == (192, 192, 128)).all()
    with pytest.raises(ValueError, match="2 colours for 3 classes"):
        visual.colour_mask(labels, 3, palette=camvid[:2])


def test_overlay_blends_the_class_colour_over_the_image(tmp_path):
    image = np.full((2, 3, 3), 100, np.uint8)
    labels = np.array([[0, 1, 2], [IGNORE_INDEX, 1, 0]])
    path = visual.save_overlay(image, labels, tmp_path / "overlay.png", num_classes=3, alpha=0.5)
    saved = np.asarray(Image.open(path))
    expected = np.round(0.5 * visual.class_colours(3)[1].astype(float) + 50)
    assert (saved[0, 1] == expected).all() and (saved[1, 0] == 100).all()  # ignored: the image itself
    with pytest.raises(ValueError, match="differ in size"):
        visual.blend(image, labels[:1], 3)


def test_write_predictions_writes_masks_and_overlays_and_names_a_bad_image(model, tmp_path):
    import io
    import json

    from segprune.eval.inference import Predictor
    from segprune.report.predictions import write_predictions

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(rgb(40, 60)).save(images / "a.png")
    Image.fromarray(rgb(70, 30, seed=1)).convert("L").save(images / "b.jpg")  # grey JPEG of another size
    (tmp_path / "other").mkdir()
    Image.fromarray(rgb(20, 20, seed=2)).save(tmp_path / "other" / "a.png")  # the same stem in another folder
    buf = io.BytesIO()
    Image.fromarray(rgb(40, 60)).save(buf, format="JPEG")
    (images / "cut.jpg").write_bytes(buf.getvalue()[:300])  # truncated
    predictor = Predictor(model, class_names=["sky", "road", "car"], size=(32, 48))
    out = tmp_path / "out"
    summary = write_predictions(predictor, [images, tmp_path / "other" / "a.png"], out)
    entries = {Path(e["image"]).name + Path(e["image"]).parent.name: e for e in summary["images"]}
    assert summary["failed"] == 1 and "cut.jpg: cannot read image" in entries["cut.jpgimages"]["error"]
    assert entries["a.pngimages"]["mask"] == "images_a_mask.png" and entries["a.pngother"]["mask"] == "other_a_mask.png"
    with Image.open(out / entries["b.jpgimages"]["mask"]) as mask:
        assert mask.mode == "P" and mask.size == (30, 70) and np.asarray(mask).max() < 3
    with Image.open(out / "b_overlay.jpg") as overlay:
        assert overlay.size == (30, 70) and overlay.mode == "RGB"
    assert abs(sum(entries["b.jpgimages"]["class_share"].values()) - 1) < 1e-5
    assert set(entries["a.pngother"]["class_share"]) <= {"sky", "road", "car"}
    assert json.loads((out / "predictions.json").read_text()) == summary
    # the folder is claimed by the command (segprune.workflows.rundir, tests/test_claim.py); the library writes over
    assert write_predictions(predictor, [tmp_path / "other"], out)["failed"] == 0
    with pytest.raises(FileNotFoundError, match="missing.png: no such image"):
        write_predictions(predictor, [tmp_path / "missing.png"], tmp_path / "out2")


def test_predictor_rejects_unknown_settings(model):
    from segprune.eval.inference import Predictor

    with pytest.raises(TypeError, match="tiles"):
        Predictor(model, tiles=64)
    assert Predictor(model).predict(rgb(16, 24)).shape == (16, 24)
