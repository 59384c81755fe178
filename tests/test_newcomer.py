"""The newcomer's path through the CLI on real files: a failed run leaves its folder reusable, every step can be
reported, `segprune predict` writes masks for mixed-size images, `check` scans the splits a folder dataset has,
`--model` builds the model at its own width, and Ctrl-C ends a training run with the command that resumes it."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from segprune import checkpoint, cli
from segprune.cli import main
from segprune.models import create_model

TINY = ["--set", "width=0.03125", "--set", "train_samples=4", "--set", "val_samples=2", "--set", "batch_size=2",
        "--set", "size=[32,32]", "--set", "threads=1", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A `segprune train` run folder of a tiny PSPNet on the synthetic scenes (one epoch)."""
    out = tmp_path_factory.mktemp("newcomer") / "train"
    assert main(["train", "--model", "test_pspnet", "--data", "synthetic", "--out", str(out), "--set", "epochs=1",
                 *TINY]) == 0
    return out


def test_a_run_that_failed_before_its_first_checkpoint_leaves_the_folder_reusable(tmp_path, capsys):
    out = tmp_path / "run"
    missing = tmp_path / "no-such-data"
    assert main(["train", "--model", "test_pspnet", "--data", f"folder:{missing}", "--out", str(out),
                 "--set", "epochs=1", *TINY]) == 2
    assert str(missing) in capsys.readouterr().err
    assert (out / "recipe.yaml").is_file()  # the failed run wrote its recipe ...
    assert main(["train", "--model", "test_pspnet", "--data", "synthetic", "--out", str(out), "--set", "epochs=1",
                 *TINY]) == 0  # ... and the corrected command needs no --force
    assert (out / "model" / "weights.safetensors").is_file()
    assert "mIoU" in capsys.readouterr().out  # --quiet still prints the result


def test_quiet_training_prints_its_result_and_model_width_is_the_models_own(trained):
    config = checkpoint.load_config(trained / "model")
    assert config["model_kwargs"]["width"] == 0.03125  # --set width wins
    header, first = (trained / "train.csv").read_text().splitlines()[:2]
    assert header.endswith("val_miou") and 0 <= float(first.split(",")[-1]) <= 1  # validation mIoU per epoch
    assert config["class_names"], "the checkpoint records the class names for predict and reports"


def test_model_named_on_the_cli_is_built_at_its_own_width(tmp_path):
    out = tmp_path / "run"
    tiny = ["--set", "train_samples=2", "--set", "val_samples=2", "--set", "batch_size=2", "--set", "size=[32,32]",
            "--set", "threads=1", "--set", "epochs=1", "--quiet"]
    assert main(["train", "--model", "test_pspnet", "--data", "synthetic", "--out", str(out), *tiny]) == 0
    config = checkpoint.load_config(out / "model")
    assert "width" not in config["model_kwargs"]
    params = sum(p.numel() for p in checkpoint.load(out / "model").parameters())
    default = sum(p.numel() for p in create_model("test_pspnet", num_classes=6).parameters())
    assert params == default <= 100_000


def test_report_on_train_prune_finetune_folders(trained, tmp_path, capsys):
    pruned, tuned = tmp_path / "pruned", tmp_path / "tuned"
    assert main(["prune", str(trained / "model"), "--ratio", "0.3", "--size", "32", "32", "--out", str(pruned)]) == 0
    assert main(["finetune", str(pruned), "--out", str(tuned), "--quiet", "--set", "finetune_epochs=1"]) == 0
    assert main(["report", str(trained)]) == 0  # one folder holding a checkpoint: its own report
    single = json.loads((trained / "report.json").read_text())
    assert single["per_class_iou"] and single["environment"]["torch"] == torch.__version__
    assert main(["report", str(trained), str(pruned), str(tuned), "--out", str(tmp_path / "steps")]) == 0
    combined = json.loads((tmp_path / "steps" / "report.json").read_text())
    rows = [run["report"] for run in combined["runs"]]
    assert len(rows) == 3 and rows[0]["before"] == rows[0]["after"]
    assert rows[1]["after"]["params"] < rows[0]["after"]["params"]  # the pruned step against the first
    assert not combined["notes"], combined["notes"]  # every plot drawn, the channel widths of each step too
    assert "report of 3 run(s)" in capsys.readouterr().out


def test_predict_writes_masks_and_overlays_of_mixed_size_images(trained, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("small.png", (24, 40)), ("large.jpg", (70, 50))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(images / name)
    (images / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main(["predict", str(trained / "model"), str(images), "--out", str(out), "--tile", "32", "32"]) == 2
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "1 image(s) could not be predicted" in err
    for stem, size in (("small", (24, 40)), ("large", (70, 50))):
        mask = np.array(Image.open(out / f"{stem}_mask.png"))
        assert mask.shape == size and mask.max() < 6
        assert (out / f"{stem}_overlay.jpg").is_file()
    assert main(["predict", str(trained / "model"), str(images), "--out", str(out)]) == 2  # no overwrite
    assert "--force" in capsys.readouterr().err


def test_check_scans_the_splits_a_folder_dataset_has(tmp_path, capsys):
    root = tmp_path / "people"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k in range(10):  # a flat folder: every 5th sample is validation, and there is no test split
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / f"{k}.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "masks" / f"{k}.png")
    assert main(["check", "--data", f"human:{root}"]) == 0
    printed = capsys.readouterr().out
    assert "train: 8 samples, 0 bad" in printed and "val: 2 samples, 0 bad" in printed, printed


def test_ctrl_c_ends_training_with_the_resume_command(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def interrupted(recipe, folder, device, **kwargs):
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints" / "latest").write_text("step-0000001")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_training", interrupted)
    argv = ["train", "--model", "test_pspnet", "--out", str(out), "--force"]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(f"segprune train --model test_pspnet --out {out} --resume")


def test_prune_a_checkpoint_to_a_latency_target_measures_and_keeps_the_table(trained, tmp_path, capsys):
    out = tmp_path / "fast"
    assert main(["prune", str(trained / "model"), "--target-latency", "0.9", "--size", "32", "32",
                 "--out", str(out)]) == 0
    table = out / "latency_table_eager_t1.json"
    assert table.is_file() and "removed" in capsys.readouterr().out
    again = tmp_path / "again"  # the table is reused, and one of other conditions is refused
    assert main(["prune", str(trained / "model"), "--target-latency", "0.9", "--size", "32", "32",
                 "--latency-table", str(table), "--latency-threads", "2", "--out", str(again)]) == 2
    assert "threads" in capsys.readouterr().err


def test_a_recipe_runs_to_a_latency_target(tmp_path):
    from segprune.workflows import recipe_from, run

    recipe = recipe_from(None, {"model": "test_pspnet", "width": "0.03125", "train_samples": "4", "val_samples": "2",
                                "batch_size": "2", "epochs": "1", "finetune_epochs": "1", "size": "[32,32]",
                                "threads": "1", "latency_rounds": "1", "latency_runs": "1", "method": "l1",
                                "target_latency": "0.9", "report_samples": "0"})
    report = run(recipe, tmp_path / "run", progress=False)
    allocation = report["pruning"]["latency_allocation"]
    assert allocation["target"] == 0.9 and allocation["runtime"] == "eager" and allocation["predicted_ratio"] < 1
    # closed loop: every allocation was measured on the runtime (a 32-pixel model is too noisy to assert the 5 %)
    assert allocation["tries"] and allocation["measured_ratio"] == pytest.approx(min(
        (t["measured"] for t in allocation["tries"] if "measured" in t), key=lambda m: abs(m - 0.9)), abs=1e-4)
    assert (tmp_path / "run" / "latency_table_eager_t1.json").is_file()
    assert len(report["curves"]["train"]["val_miou"]) == len(report["curves"]["train"]["loss"]) == 1
    with pytest.raises(ValueError, match="excludes target_macs"):
        recipe_from(None, {"target_latency": "0.5", "target_macs": "0.5"})
