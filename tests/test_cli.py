"""The CLI end to end on a tiny model, the checkpoint round trip, and refusing to overwrite a run."""

import json
from pathlib import Path

import pytest
import torch

import segprune
from segprune import checkpoint
from segprune.cli import main
from segprune.workflows import compress, recipe_from

TINY = ["--set", "model=test_pspnet", "--set", "width=0.03125", "--set", "train_samples=16", "--set", "val_samples=8",
        "--set", "epochs=1", "--set", "finetune_epochs=1", "--set", "size=[32,32]", "--set", "threads=1",
        "--set", "latency_rounds=1",
        "--set", "latency_runs=2", "--quiet"]


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
        recipe_from(None, {"epochz": "3"})
    with pytest.raises(ValueError, match="epochs"):
        recipe_from(None, {"epochs": "three"})


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


@pytest.mark.parametrize("method", ["slimming", "cap", "bn_scale", "l1", "l2", "fpgm", "taylor", "random"])
def test_every_method_runs_end_to_end_from_a_recipe_file(tmp_path, method):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nmethod: {method}\ntarget_macs: 0.6\niterations: 2\nkd_alpha: 0.5\n")
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), *TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["method"] == method
    assert report["after"]["macs"] <= 0.6 * report["before"]["macs"]


def test_a_recipe_re_scores_in_the_steps_it_names(tmp_path, monkeypatch):
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["rescore"])
        return segprune.prune(*args, **kwargs)

    monkeypatch.setattr(compress, "prune", spy)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nmethod: taylor\ntarget_macs: 0.6\nrescore: 3\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), *TINY]) == 0
    assert seen == [3]
    recipe.write_text("rescore: 0\n")
    with pytest.raises(ValueError, match="rescore must be >= 1"):
        recipe_from(recipe)


def test_prune_cli_on_a_checkpoint_composes_plans(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "smaller"
    assert main(["demo", "--out", str(run_dir), *TINY]) == 0
    assert main(["prune", str(run_dir / "pruned"), "--method", "l1", "--target-macs", "0.7", "--size", "32", "32",
                 "--out", str(out)]) == 0
    before, after = checkpoint.load(run_dir / "pruned"), checkpoint.load(out)
    assert sum(p.numel() for p in after.parameters()) < sum(p.numel() for p in before.parameters())
    assert main(["prune", str(run_dir / "pruned"), "--out", str(out), "--size", "32", "32"]) == 2  # no --force


def test_bad_recipe_values_are_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: magic\n")
    with pytest.raises(ValueError, match="magic"):
        recipe_from(recipe)
    recipe.write_text("lam: -1\n")
    with pytest.raises(ValueError, match="lam"):
        recipe_from(recipe)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_parse(path):
    recipe = recipe_from(path)
    assert recipe.name == path.stem


@pytest.mark.data
def test_pipeline_runs_on_real_camvid(tmp_path, data_root):
    out = tmp_path / "camvid"
    recipe = Path(__file__).parents[1] / "recipes" / "slimming_segnet_camvid_cpu.yaml"
    args = ["run", str(recipe), "--out", str(out), *TINY, "--set", "model=test_segnet",
            "--set", f"data_root={data_root / 'camvid'}", "--set", "size=[64,64]", "--set", "eval_size=[96,128]"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert 0 <= report["after"]["miou"] <= 1 and report["after"]["macs"] <= 0.5 * report["before"]["macs"]


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    from segprune.models import create_model

    folder = checkpoint.save(tmp_path / "ck", create_model("test_unet", num_classes=3),
                             config={"model": "test_segnet", "model_kwargs": {"num_classes": 3}})
    with pytest.raises(ValueError, match="does not fit"):
        checkpoint.load(folder)


def test_check_reports_every_bad_file(tmp_path, capsys):
    from PIL import Image

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(images / f"{i}.png")
        Image.new("L", (8, 8)).save(masks / f"{i}.png")
    for i in (0, 2):
        (images / f"{i}.png").write_bytes(b"not a png")  # truncated / unreadable
    assert main(["check", "--data", f"folder:{tmp_path}"]) == 2
    out = capsys.readouterr().out
    assert "3 samples, 2 bad" in out and "0.png" in out and "2.png" in out and "1.png" not in out


def test_class_weights_need_a_dataset_that_has_them(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "r"), *TINY, "--set", "class_weights=true"]) == 2
    assert "no class weights" in capsys.readouterr().err
