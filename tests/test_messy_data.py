"""Messy real-world files: a truncated JPEG, an out-of-range label, masks of another label set, images of several
sizes. Every error names the file (and the value); `check_splits` reports every bad file of every split that
exists; evaluation on mixed sizes equals per-image evaluation and, on same-size data, the stacked path."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from segprune.data import CamVid, HumanFolder, MaskFolder
from segprune.data.base import IGNORE_INDEX, LabelValueError, MissingSplitError, UnreadableFileError
from segprune.data.check import check_splits
from segprune.data.loader import SizeGroups, collate_by_size, make_loader, size_tolerant
from segprune.eval.metrics import ConfusionMatrix, evaluate


def write(path, array, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, format=fmt)


def rgb(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def truncated_jpeg(path, height=32, width=40):
    """A real JPEG cut in half: its header reads, decoding it fails with PIL's 'image file is truncated'."""
    buf = io.BytesIO()
    Image.fromarray(rgb(height, width)).save(buf, format="JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def human_tree(root, sizes):
    for k, (h, w) in enumerate(sizes):
        write(root / "images" / f"{k}.jpg", rgb(h, w, seed=k), "JPEG")
        write(root / "masks" / f"{k}.png", (rgb(h, w, seed=k)[..., 0] > 127) * 255)
    return root


def camvid_tree(root, labels_by_split):
    """A SegNet-layout CamVid with one 6x8 sample per label array given."""
    for split, labels in labels_by_split.items():
        lines = []
        for k, label in enumerate(labels):
            write(root / split / f"{k}.png", rgb(6, 8, seed=k))
            write(root / f"{split}annot" / f"{k}.png", label)
            lines.append(f"/SegNet/CamVid/{split}/{k}.png /SegNet/CamVid/{split}annot/{k}.png")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_a_truncated_jpeg_is_named_when_read(tmp_path):
    root = human_tree(tmp_path, [(32, 40)] * 3)
    truncated_jpeg(root / "images" / "1.jpg")
    dataset = HumanFolder(root)  # the header is fine: construction passes
    dataset[0]
    with pytest.raises(UnreadableFileError, match=r"1\.jpg: cannot read image \(OSError: image file is truncated"):
        dataset[1]
    (root / "masks" / "2.png").write_bytes(b"not a png")
    with pytest.raises(OSError, match=r"2\.png: cannot read mask"):
        HumanFolder(root, check_sizes=False)[2]


def test_camvid_void_is_ignored_and_a_foreign_label_names_file_and_value(tmp_path):
    good = np.array([[0, 10, 11, 3]] * 6).repeat(2, 1)  # 6x8: classes 0, 10, 3 and void 11
    bad = good.copy()
    bad[2, 3] = 20
    root = camvid_tree(tmp_path, {"train": [good, bad]})
    dataset = CamVid(root, "train")
    assert set(dataset[0][1].unique().tolist()) == {0, 3, 10, IGNORE_INDEX}
    with pytest.raises(LabelValueError, match=r"trainannot/1\.png: label value\(s\) 20 are neither a class \(0\.\.10\) "
                                              r"nor void \(11, 255\)"):
        dataset[1]


@pytest.mark.data
def test_real_camvid_masks_read_without_error(data_root):
    dataset = CamVid(data_root / "camvid", "val", check_sizes=False)
    labels = torch.cat([dataset[k][1].unique() for k in range(0, len(dataset), 10)]).unique().tolist()
    assert set(labels) <= {*range(11), IGNORE_INDEX} and IGNORE_INDEX in labels


def test_check_scans_existing_splits_and_reports_every_bad_file(tmp_path):
    good = np.zeros((6, 8))
    root = camvid_tree(tmp_path / "camvid", {"train": [good, good + 20, good], "val": [good, good]})
    truncated_jpeg(root / "val" / "1.png")  # a JPEG's bytes under a .png name: still named, still read by content

    def build(split):
        return CamVid(root, split, check_sizes=False)

    checks = {c.split: c for c in check_splits(build)}
    assert checks["test"].missing and "test.txt" in checks["test"].missing
    assert checks["train"].samples == 3 and len(checks["train"].problems) == 1
    finding = checks["train"].problems[0]
    assert finding.startswith(str(root / "trainannot" / "1.png")) and "20" in finding
    assert len(checks["val"].problems) == 1 and "val/1.png: cannot read image" in checks["val"].problems[0]
    assert checks["test"].summary().startswith("test: absent") and checks["val"].summary() == "val: 2 samples, 1 bad"

    flat = human_tree(tmp_path / "human", [(8, 8), (8, 8), (12, 8), (8, 8), (8, 8)])
    checks = check_splits(lambda split: HumanFolder(flat, split, check_sizes=False))
    assert [c.missing is None for c in checks] == [True, True, False]  # a flat folder has no test split
    assert sum(c.sizes[(12, 8)] for c in checks) == 1
    mixed = next(c for c in checks if len(c.sizes) > 1)
    assert "8x8 (" in mixed.size_note() and "12x8 (1)" in mixed.size_note() and "`eval_size`" in mixed.size_note()
    assert checks[-1].size_note() is None
    with pytest.raises(MissingSplitError, match="no split found"):
        check_splits(lambda split: HumanFolder(flat, split), splits=("test", "extra"))


def test_a_training_batch_of_mixed_sizes_names_the_sizes_and_the_option(tmp_path):
    dataset = HumanFolder(human_tree(tmp_path, [(8, 10), (8, 10), (12, 10)]), check_sizes=False)
    loader = make_loader(dataset, batch_size=3, shuffle=False, seed=0)
    with pytest.raises(ValueError, match=r"2 sizes \(H x W: 8x10 \(2\), 12x10 \(1\)\).*`size`.*`eval_size`"):
        next(iter(loader))


class _Pointwise(nn.Module):
    """A 1x1 convolution: per-pixel, so batching and image size cannot change its output."""

    def __init__(self, k=2):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, k, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


def test_evaluate_on_mixed_sizes_equals_per_image_evaluation(tmp_path):
    dataset = HumanFolder(human_tree(tmp_path, [(8, 10), (12, 10), (8, 10), (6, 14), (12, 10)]), check_sizes=False)
    model = _Pointwise()
    batch = collate_by_size([dataset[k] for k in range(4)])
    assert isinstance(batch, SizeGroups) and [tuple(g[0].shape) for g in batch] == [(2, 3, 8, 10), (1, 3, 12, 10),
                                                                                   (1, 3, 6, 14)]
    got = evaluate(model, DataLoader(dataset, batch_size=4), num_classes=2)  # the default collate: rebuilt
    matrix = ConfusionMatrix(2)
    with torch.no_grad():
        for k in range(len(dataset)):
            image, target = dataset[k]
            matrix.update(model(image[None])["out"], target[None])
    assert got == matrix.compute()


def test_same_size_data_keeps_the_stacked_batches(tmp_path):
    dataset = HumanFolder(human_tree(tmp_path, [(8, 10)] * 5), check_sizes=False)
    loader = DataLoader(dataset, batch_size=2)
    for plain, tolerant in zip(loader, size_tolerant(loader), strict=True):
        assert not isinstance(tolerant, SizeGroups)
        assert all(torch.equal(a, b) for a, b in zip(plain, tolerant))
    seen = []

    class Spy(_Pointwise):
        def forward(self, x):
            seen.append(x.shape[0])
            return super().forward(x)

    evaluate(Spy(), loader, num_classes=2)
    assert seen == [2, 2, 1]


def test_mask_folder_out_of_range_label_is_a_label_error(tmp_path):
    write(tmp_path / "images" / "a.png", rgb(4, 4))
    write(tmp_path / "masks" / "a.png", np.full((4, 4), 7))
    (tmp_path / "classes.txt").write_text("sky\nroad\n")
    with pytest.raises(LabelValueError, match=r"a\.png: label 7"):
        MaskFolder(tmp_path, classes_file=tmp_path / "classes.txt")[0]


@pytest.fixture
def tiny_checkpoint(tmp_path):
    from segprune import checkpoint
    from segprune.models import create_model

    torch.manual_seed(0)
    return checkpoint.save(tmp_path / "ck", create_model("test_pspnet", num_classes=2),
                           config={"model": "test_pspnet", "model_kwargs": {"num_classes": 2}})


def test_segprune_eval_on_mixed_sizes_and_on_a_truncated_jpeg(tmp_path, tiny_checkpoint, capsys):
    from segprune.cli import main

    data = human_tree(tmp_path / "human", [(40, 60), (50, 40), (40, 60), (33, 47)])
    assert main(["eval", str(tiny_checkpoint), "--data", f"human:{data}", "--split", "all", "--batch-size", "4"]) == 0
    assert "foreground IoU" in capsys.readouterr().out  # no stack error: batches are grouped by size
    truncated_jpeg(data / "images" / "2.jpg", 40, 60)
    assert main(["eval", str(tiny_checkpoint), "--data", f"human:{data}", "--split", "all"]) == 2
    err = capsys.readouterr().err
    assert "2.jpg: cannot read image (OSError: image file is truncated" in err and "Traceback" not in err
