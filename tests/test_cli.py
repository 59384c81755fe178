"""The CLI end to end on a tiny model, the checkpoint round trip, and refusing to overwrite a run."""

import json

import pytest
import torch

from segprune import checkpoint
from segprune.cli import main
from segprune.demo import config_from

TINY = ["--set", "model=test_pspnet", "--set", "width=1.0", "--set", "train_samples=16", "--set", "val_samples=8",
        "--set", "epochs=1", "--set", "finetune_epochs=1", "--set", "size=[32,32]", "--quiet"]


def test_demo_end_to_end_writes_report_and_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert main(["demo", "--out", str(out), *TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    for side in ("before", "after"):
        assert set(report[side]) >= {"miou", "params", "macs", "size_bytes", "latency_ms"}
        assert report[side]["latency"]["threads"] >= 1
    assert report["after"]["params"] < report["before"]["params"]
    assert report["after"]["macs"] < report["before"]["macs"]
    assert "| mIoU (%) |" in (out / "report.md").read_text()
    model = checkpoint.load(out / "pruned")
    assert model(torch.zeros(1, 3, 32, 32))["out"].shape == (1, 6, 32, 32)
    assert sum(p.numel() for p in model.parameters()) < report["before"]["params"]


def test_demo_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["demo", "--out", str(out), *TINY]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"


def test_unknown_or_mistyped_setting_is_named():
    with pytest.raises(ValueError, match="epochz"):
        config_from({"epochz": "3"})
    with pytest.raises(ValueError, match="epochs"):
        config_from({"epochs": "three"})


def test_truncated_weights_are_a_clear_error(tmp_path):
    from segprune.models import create_model

    model = create_model("test_unet", num_classes=3)
    folder = checkpoint.save(tmp_path / "ck", model, config={"model": "test_unet", "model_kwargs": {"num_classes": 3}})
    restored = checkpoint.load(folder)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(restored(x)["out"], model.eval()(x)["out"])
    weights = folder / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="weights.safetensors"):
        checkpoint.load(folder)
