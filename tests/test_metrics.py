"""mIoU and friends from a confusion matrix, checked against answers worked out by hand."""

import math

import pytest
import torch
from torch import nn

from segprune.eval.metrics import ConfusionMatrix, evaluate


def _labels(pairs):
    """Targets and predictions (1, 1, n) from a list of (target, prediction, count)."""
    target = [t for t, _, n in pairs for _ in range(n)]
    pred = [p for _, p, n in pairs for _ in range(n)]
    return torch.tensor(pred).view(1, 1, -1), torch.tensor(target).view(1, 1, -1)


def test_hand_built_matrix():
    # Rows = target, columns = prediction:
    #   class 0: 3 right, 1 predicted as 1      -> IoU 3 / (4 + 3 - 3) = 3/4
    #   class 1: 2 right, 2 predicted as 2      -> IoU 2 / (4 + 3 - 2) = 2/5
    #   class 2: 1 right                        -> IoU 1 / (1 + 3 - 1) = 1/3
    pred, target = _labels([(0, 0, 3), (0, 1, 1), (1, 1, 2), (1, 2, 2), (2, 2, 1)])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.mat.tolist() == [[3, 1, 0], [0, 2, 2], [0, 0, 1]]
    result = cm.compute()
    assert result["iou"] == pytest.approx([3 / 4, 2 / 5, 1 / 3])
    assert result["miou"] == pytest.approx((3 / 4 + 2 / 5 + 1 / 3) / 3)
    assert result["pixel_acc"] == pytest.approx(6 / 9)
    assert result["mean_acc"] == pytest.approx((3 / 4 + 2 / 4 + 1 / 1) / 3)


def test_logits_are_argmaxed():
    logits = torch.zeros(1, 3, 1, 4)
    logits[0, [0, 2, 2, 1], 0, [0, 1, 2, 3]] = 1.0  # predicts 0, 2, 2, 1
    cm = ConfusionMatrix(3)
    cm.update(logits, torch.tensor([[[0, 2, 1, 1]]]))
    assert cm.mat.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]


def test_ignore_index_excluded():
    cm = ConfusionMatrix(2, ignore_index=255)
    cm.update(torch.tensor([[[0, 1, 1, 0]]]), torch.tensor([[[0, 255, 1, 255]]]))
    assert cm.mat.sum().item() == 2
    assert cm.compute()["miou"] == pytest.approx(1.0)


def test_absent_class_is_nan_and_left_out_of_mean():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([[[0, 0, 1, 1]]]), torch.tensor([[[0, 1, 1, 1]]]))  # classes 2, 3 absent
    result = cm.compute()
    assert math.isnan(result["iou"][2]) and math.isnan(result["iou"][3])
    assert result["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)  # class 0: 1/(1+2-1), class 1: 2/(3+2-2)


def test_class_only_predicted_scores_zero_not_nan():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[[2, 0]]]), torch.tensor([[[0, 0]]]))
    assert cm.compute()["iou"][2] == 0.0


def test_out_of_range_label_raises():
    with pytest.raises(ValueError):
        ConfusionMatrix(2).update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 7]]]))


def test_evaluate_restores_mode_and_reads_dict_output():
    class Oracle(nn.Module):  # predicts the target perfectly by reading it from the first channel
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(1)

        def forward(self, x):
            return {"out": nn.functional.one_hot(x[:, 0].long(), 3).permute(0, 3, 1, 2).float()}

    target = torch.randint(0, 3, (2, 5, 5), generator=torch.Generator().manual_seed(0))
    model = Oracle().train()
    result = evaluate(model, [(target[:, None].float(), target)], num_classes=3)
    assert result["miou"] == pytest.approx(1.0) and result["pixel_acc"] == pytest.approx(1.0)
    assert model.training
