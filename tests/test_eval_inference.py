"""mIoU against an independent numpy computation, foreground IoU, sliding-window and flip inference, `segprune eval`."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from segprune import checkpoint
from segprune.cli import main
from segprune.eval.metrics import ConfusionMatrix, evaluate, predict, sliding_window
from segprune.models import create_model


def _numpy_ious(pred: np.ndarray, target: np.ndarray, k: int, ignore: int) -> list[float]:
    """Per-class IoU by set operations on the pixels, no confusion matrix."""
    valid = target != ignore
    ious = []
    for c in range(k):
        p, t = (pred == c) & valid, (target == c) & valid
        union = np.logical_or(p, t).sum()
        ious.append(np.logical_and(p, t).sum() / union if union else math.nan)
    return ious


@pytest.mark.parametrize("k", [2, 5])
def test_miou_of_random_predictions_matches_numpy(k):
    rng = np.random.default_rng(k)
    target = rng.integers(0, k, size=(3, 17, 23))
    target[rng.random(target.shape) < 0.1] = 255
    if k == 5:
        target[target == 4] = 0  # class 4 only predicted: IoU 0, not NaN
    matrix, preds = ConfusionMatrix(k), []
    for _ in range(2):  # accumulates over batches
        logits = torch.from_numpy(rng.standard_normal((3, k, 17, 23)))
        matrix.update(logits, torch.from_numpy(target))
        preds.append(logits.argmax(1).numpy())
    ious = _numpy_ious(np.concatenate(preds), np.concatenate([target, target]), k, 255)
    result = matrix.compute()
    assert result["iou"] == pytest.approx(ious, nan_ok=True)
    assert result["miou"] == pytest.approx(np.nanmean(ious))
    if k == 2:
        assert result["fg_iou"] == pytest.approx(ious[1])
    else:
        assert "fg_iou" not in result and result["iou"][4] == 0.0


class _Pointwise(nn.Module):
    """A 1x1 convolution: its output at a pixel depends only on that pixel, wherever the window is."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


@pytest.mark.parametrize("size,crop,stride", [((20, 27), (8, 8), (5, 6)), ((6, 9), (8, 8), (4, 4))])
def test_sliding_window_of_a_pointwise_model_equals_one_pass(size, crop, stride):
    model, image = _Pointwise(), torch.randn(2, 3, *size)
    got = sliding_window(model, image, crop, stride)
    assert got.shape == (2, 4, *size)
    torch.testing.assert_close(got, model(image)["out"], atol=1e-6, rtol=1e-6)


def test_sliding_window_averages_overlaps_and_covers_every_pixel():
    calls = []

    def ones(x):  # logits 1 in every window: any overlap not divided out would show
        calls.append(tuple(x.shape[-2:]))
        return torch.ones(x.shape[0], 2, *x.shape[-2:])

    out = sliding_window(ones, torch.zeros(1, 3, 10, 13), 6, 4)
    assert torch.equal(out, torch.ones(1, 2, 10, 13))  # sums divided by the overlap counts
    assert len(calls) == 2 * 3 and set(calls) == {(6, 6)}  # rows at 0, 4; columns at 0, 4 and 7 (flush right)


def test_flip_averages_the_mirrored_prediction():
    ramp = lambda x: torch.arange(x.shape[-1], dtype=torch.float32).expand(x.shape[0], 2, *x.shape[-2:])
    flipped = predict(ramp, torch.zeros(1, 3, 4, 5), flip=True)
    assert torch.allclose(flipped, torch.full((1, 2, 4, 5), 2.0))  # (x + (4 - x)) / 2
    model, image = _Pointwise(), torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(predict(model, image, flip=True), model(image)["out"])


def test_evaluate_with_windows_and_flip_on_an_oracle():
    class Oracle(nn.Module):  # channel 0 of the image holds the label: predicts it perfectly at any offset
        def forward(self, x):
            return nn.functional.one_hot(x[:, 0].long(), 3).permute(0, 3, 1, 2).float()

    target = torch.randint(0, 3, (2, 12, 12), generator=torch.Generator().manual_seed(0))
    images = target[:, None].float().expand(2, 3, 12, 12)
    result = evaluate(Oracle(), [(images, target)], num_classes=3, crop=(8, 8), stride=(5, 5), flip=True)
    assert result["miou"] == pytest.approx(1.0)
    wrong = evaluate(Oracle(), [(images, (target + 1) % 3)], num_classes=3, crop=(8, 8))
    assert wrong["miou"] == 0.0


def test_eval_cli_prints_metrics_and_foreground_iou(tmp_path, capsys):
    model = create_model("test_unet", num_classes=2)
    recipe = {"size": [32, 32], "seed": 0, "val_samples": 3}
    folder = checkpoint.save(tmp_path / "ck", model, config={"model": "test_unet", "model_kwargs": {"num_classes": 2},
                                                             "recipe": recipe})
    assert main(["eval", str(folder), "--data", "synthetic", "--split", "test", "--flip"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mIoU ") and "foreground IoU" in out and "ground" in out and "sky" in out
    miou = float(out.split()[1])
    assert 0 <= miou <= 1
    assert main(["eval", str(folder), "--data", "camvid:" + str(tmp_path / "missing")]) == 2  # named, not a trace


def test_multi_scale_testing_averages_rescaled_predictions():
    import torch
    from torch import nn

    from segprune.eval.metrics import predict

    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(predict(model, x, scales=(1.0,)), model(x))
    both = predict(model, x, scales=(0.5, 1.0))
    half = nn.functional.interpolate(model(nn.functional.interpolate(x, size=(8, 8), mode="bilinear")), size=(16, 16),
                                     mode="bilinear")
    assert both.shape == (2, 4, 16, 16)
    assert torch.allclose(both, (half + model(x)) / 2, atol=1e-6)
