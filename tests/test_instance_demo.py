"""`segprune demo --task instance` end to end (reduced: one epoch each, a few tiny scenes), through the CLI entry."""

import json

import pytest
import torch

from segprune import checkpoint
from segprune.cli import main
from segprune.workflows.recipe import demo_recipe
from segprune.workflows.tasks import task_of

TINY = ["--set", "train_samples=8", "--set", "val_samples=4", "--set", "batch_size=4", "--set", "epochs=1",
        "--set", "finetune_epochs=1", "--set", "size=[48,48]", "--set", "threads=1", "--set", "latency_rounds=1",
        "--set", "latency_runs=1", "--quiet"]
AP = [f"{kind}_{name}" for kind in ("box", "mask") for name in ("ap", "ap50", "ap75")]


def test_instance_demo_writes_a_report_with_ap_and_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["demo", "--task", "instance", "--out", str(out), *TINY]) == 0
    assert {"report.json", "report.md", "report.html", "recipe.yaml", "log.txt", "pruned"} <= \
        {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "instance" and report["recipe"]["task"] == "instance"
    for side in ("before", "after"):
        row = report[side]
        for key in AP:
            assert 0.0 <= row[key] <= 1.0, (side, key, row[key])
        assert "miou" not in row
        assert row["params"] > 0 and row["macs"] > 0 and row["size_bytes"] > 0 and row["latency_ms"] > 0
    assert report["after"]["params"] < report["before"]["params"]
    assert 0 < report["pruning"]["removed_channels"] < report["pruning"]["prunable_channels"]
    markdown = (out / "report.md").read_text()
    assert "| mask AP (%) |" in markdown and "| box AP (%) |" in markdown and "| mIoU (%) |" not in markdown
    assert "mask AP" in (out / "report.html").read_text()
    assert "box AP" in capsys.readouterr().out
    model = checkpoint.load(out / "pruned")
    assert checkpoint.load_config(out / "pruned")["task"] == "instance"
    outputs = model(torch.zeros(1, 3, 48, 48))
    assert outputs["coef"].shape[-1] == outputs["proto"].shape[1]  # prototypes and coefficients still match


def test_instance_demo_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["demo", "--task", "instance", "--out", str(out), *TINY]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"


def test_instance_demo_refuses_methods_it_does_not_run():
    with pytest.raises(ValueError, match="slimming"):
        task_of("instance").check(demo_recipe("instance", {"method": "cap"}))
    assert demo_recipe("instance").model == "test_yolact"
