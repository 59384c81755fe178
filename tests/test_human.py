"""The human (person / background) segmentation pipeline on a folder of images and binary masks."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segprune.cli import main
from segprune.data import build_dataset
from segprune.data.folder import HumanFolder

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "miao_human_cpu.yaml")


def human_folder(root, n=10, size=40, seed=0):
    """Synthetic 'people': a bright ellipse (person, 255) on a noisy dark background (0)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx, ry, rx = rng.integers(12, 28), rng.integers(12, 28), rng.integers(6, 14), rng.integers(4, 9)
        person = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        image = rng.integers(0, 90, (size, size, 3))
        image[person] = rng.integers(160, 256, (int(person.sum()), 3))
        Image.fromarray(image.astype(np.uint8)).save(root / "images" / f"p{i:02d}.jpg")
        Image.fromarray((person * 255).astype(np.uint8)).save(root / "masks" / f"p{i:02d}.png")
    return root


def test_binary_masks_map_to_two_classes_and_split(tmp_path):
    root = human_folder(tmp_path / "h")
    train, val = build_dataset("human", root=root, split="train"), build_dataset("human", root=root, split="val")
    assert (len(train), len(val)) == (8, 2) and isinstance(train, HumanFolder)
    assert not {p.stem for p, _ in train.samples} & {p.stem for p, _ in val.samples}
    image, mask = val[0]
    raw = np.array(Image.open(val.samples[0][1]))
    assert image.shape == (3, 40, 40) and set(mask.unique().tolist()) == {0, 1}
    assert (mask.numpy() == (raw == 255)).all()
    with pytest.raises(ValueError, match="no 'test' split"):
        build_dataset("human", root=root, split="test")


def test_class_weights_are_median_frequency(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for stem, person in (("a", 4), ("b", 0)):  # 4 of 16 pixels person in a, none in b
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / f"{stem}.png")
        mask = np.zeros(16, np.uint8)
        mask[:person] = 255
        Image.fromarray(mask.reshape(4, 4)).save(tmp_path / "masks" / f"{stem}.png")
    # freq(background) = 28 / 32, freq(person) = 4 / 16; the median of the two is their mean
    median = (28 / 32 + 4 / 16) / 2
    assert build_dataset("human", root=tmp_path).class_weights == pytest.approx((median / (28 / 32), median / 0.25))


def test_split_folders_are_used_when_present(tmp_path):
    human_folder(tmp_path / "train", n=3)
    human_folder(tmp_path / "val", n=2, seed=1)
    assert len(build_dataset("human", root=tmp_path, split="train")) == 3
    assert len(build_dataset("human", root=tmp_path, split="val")) == 2
    with pytest.raises(FileNotFoundError, match="no 'test' split"):
        build_dataset("human", root=tmp_path, split="test")


def test_values_other_than_0_and_255_name_the_files(tmp_path):
    root = human_folder(tmp_path / "h", n=25)
    for i in range(23):  # more bad files than the error lists
        mask = np.array(Image.open(root / "masks" / f"p{i:02d}.png"))
        mask[0, :3] = [1, 128, 7]
        Image.fromarray(mask).save(root / "masks" / f"p{i:02d}.png")
    with pytest.raises(ValueError) as err:
        build_dataset("human", root=root, split="train")
    message = str(err.value)
    assert "23 of 25 binary masks" in message and "p00.png (values 1, 7, 128)" in message
    assert "p19.png" in message and "p20.png" not in message and "and 3 more" in message
    assert "p23.png" not in message and "p24.png" not in message
    assert len(build_dataset("human_matte", root=root, split="all")) == 25  # the lenient reader still reads them


def test_cli_runs_the_human_recipe_and_reports_foreground_iou(tmp_path, capsys):
    root, out = human_folder(tmp_path / "h"), tmp_path / "run"
    tiny = ["model=test_pspnet", "width=0.03125", "size=[32,32]", "eval_size=[32,32]", "epochs=1", "finetune_epochs=1",
            "batch_size=4", "threads=1", "latency_rounds=1", "latency_runs=2", "report_samples=0", "stage_a_epochs=1",
            "slim_widths=ppm.branches=8,head.0=8"]  # the recipe's widths are for pspnet_resnet18 x0.5
    args = ["run", RECIPE, "--data", f"human:{root}", "--out", str(out), "--quiet"]
    assert main(args + [a for kv in tiny for a in ("--set", kv)]) == 0
    report = json.loads((out / "report.json").read_text())
    for side in ("before", "after"):
        assert 0 <= report[side]["fg_iou"] <= 1 and len(report[side]["iou"]) == 2
        assert report[side]["miou"] == pytest.approx(np.nanmean(report[side]["iou"]))
    assert report["recipe"]["data"] == "human" and report["recipe"]["schedule"] == "two_stage"
    assert report["after"]["macs"] < report["before"]["macs"]
    assert "foreground IoU" in capsys.readouterr().out


def test_cli_names_bad_masks(tmp_path, capsys):
    root = human_folder(tmp_path / "h", n=5)
    Image.fromarray(np.full((40, 40), 200, dtype=np.uint8)).save(root / "masks" / "p03.png")
    assert main(["run", RECIPE, "--data", f"human:{root}", "--out", str(tmp_path / "r"),
                 "--quiet"]) == 2
    assert "p03.png (values 200)" in capsys.readouterr().err
