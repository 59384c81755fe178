"""Gradient accumulation, mixed precision and the per-epoch CSV log of the training loop."""

import csv
import sys
import types

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from segprune.data.synthetic import SyntheticScenes
from segprune.train.loop import amp_settings, fit, train_one_epoch


def _net():
    torch.manual_seed(0)  # no BatchNorm: the batch size must not change the function
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 3, 1))


@pytest.fixture(scope="module")
def scenes():
    return SyntheticScenes(num_samples=8, size=(16, 16), num_classes=3)


def test_accumulating_two_half_batches_equals_one_full_batch(scenes):
    full, half = _net(), _net()
    fit(full, DataLoader(scenes, batch_size=4), epochs=2, lr=0.1, progress=False)
    fit(half, DataLoader(scenes, batch_size=2), epochs=2, lr=0.1, accumulate=2, progress=False)
    for (name, a), b in zip(full.state_dict().items(), half.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    moved = _net()
    assert not torch.allclose(moved[0].weight, half[0].weight)  # training did change the weights


def test_regularizer_runs_once_per_optimizer_step_after_the_group(scenes):
    model, events = _net(), []
    model.register_forward_hook(lambda *_: events.append("forward"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(scenes, batch_size=2, drop_last=False)  # 4 batches
    extra = [next(iter(loader))]  # a 5th batch: the last group has one batch and still steps
    train_one_epoch(model, list(loader) + extra, optimizer, accumulate=2, progress=False,
                    regularizer=lambda m: events.append(("reg", m[0].weight.grad is not None)))
    assert events == ["forward", "forward", ("reg", True)] * 2 + ["forward", ("reg", True)]


def test_bfloat16_autocast_on_cpu_only_when_asked(scenes):
    model, dtypes = _net(), []
    model[0].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    losses = fit(model, DataLoader(scenes, batch_size=4), epochs=1, lr=0.1, amp=True, amp_dtype="bfloat16",
                 progress=False)
    assert dtypes and set(dtypes) == {torch.bfloat16} and losses[0] == losses[0]  # ran in bf16, loss not NaN
    assert model[0].weight.dtype == torch.float32  # the weights stay in full precision
    with pytest.raises(ValueError, match="bfloat16"):
        amp_settings(True, None, "cpu")  # never silently
    with pytest.raises(ValueError, match="CUDA"):
        amp_settings(True, "float16", "cpu")
    assert amp_settings(False, None, "cpu") == (None, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float16_with_grad_scaler_on_cuda(scenes):
    dtype, scaler = amp_settings(True, None, "cuda")
    assert dtype == torch.float16 and isinstance(scaler, torch.amp.GradScaler)
    model = _net()
    losses = fit(model, DataLoader(scenes, batch_size=4), epochs=3, lr=0.1, amp=True, device="cuda",
                 progress=False)
    assert losses[-1] < losses[0] and all(torch.isfinite(p).all() for p in model.parameters())


def test_csv_log_has_one_row_per_epoch(scenes, tmp_path):
    losses = fit(_net(), DataLoader(scenes, batch_size=4), epochs=3, lr=0.1, progress=False, log_dir=tmp_path)
    with (tmp_path / "train.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and [int(r["step"]) for r in rows] == [2, 4, 6]
    assert [float(r["loss"]) for r in rows] == losses
    assert float(rows[-1]["lr"]) == 0.0 and float(rows[0]["lr"]) > 0  # poly decay reaches 0 at the last step
    assert all(float(r["seconds"]) > 0 for r in rows)


def test_tensorboard_gets_the_epoch_scalars_when_it_imports(scenes, tmp_path, monkeypatch):
    scalars = []

    class SummaryWriter:  # stands in for torch.utils.tensorboard's, which may not be installed
        def __init__(self, log_dir):
            scalars.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def flush(self):
            pass

        def close(self):
            scalars.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    fit(_net(), DataLoader(scenes, batch_size=4), epochs=2, lr=0.1, progress=False, log_dir=tmp_path)
    assert scalars[0] == ("dir", str(tmp_path / "tensorboard")) and scalars[-1] == "closed"
    assert ("train/loss", 1) in scalars and ("train/lr", 2) in scalars and len(scalars) == 2 + 2 * 3
