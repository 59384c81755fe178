"""Datasets on the real data (CamVid, Cityscapes, COCO) and on small trees built in tmp_path; loaders."""

import json
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from segprune.data import (
    VOC,
    CamVid,
    Cityscapes,
    HumanFolder,
    MaskFolder,
    SyntheticScenes,
    build_dataset,
    make_loader,
    median_frequency_weights,
)
from segprune.data.base import IMAGENET_MEAN, IMAGENET_STD
from segprune.data.transforms import train_transforms


def write_image(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(array, dtype=np.uint8))
    (image.convert(mode) if mode else image).save(path)


def rgb(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# CamVid


@pytest.fixture
def camvid_root(data_root):
    return data_root / "camvid"


@pytest.mark.data
def test_camvid_split_sizes_and_classes(camvid_root):
    sizes = {split: len(CamVid(camvid_root, split, check_sizes=False)) for split in ("train", "val", "test")}
    assert sizes == {"train": 367, "val": 101, "test": 233}
    assert CamVid.num_classes == len(CamVid.class_names) == len(CamVid.class_weights) == 11
    assert CamVid.ignore_index == 255


@pytest.mark.data
def test_camvid_sample_shapes_labels_and_void(camvid_root):
    dataset = CamVid(camvid_root, "val")
    image, mask = dataset[3]
    assert image.shape == (3, 360, 480) and image.dtype == torch.float32
    assert mask.shape == (360, 480) and mask.dtype == torch.int64
    raw = np.array(Image.open(dataset.samples[3][1]))
    assert (raw == 11).any(), "this frame was chosen because it has void pixels"
    assert torch.equal(mask == 255, torch.from_numpy(raw == 11))
    valid = mask[mask != 255]
    assert valid.min() >= 0 and valid.max() < 11
    assert torch.equal(valid, torch.from_numpy(raw[raw != 11]).long())
    # Without a transform the image is normalised with ImageNet statistics.
    pixel = np.array(Image.open(dataset.samples[3][0]).convert("RGB"))[10, 20] / 255
    np.testing.assert_allclose(image[:, 10, 20], (pixel - IMAGENET_MEAN) / IMAGENET_STD, atol=1e-5)


@pytest.mark.data
def test_camvid_with_train_transforms(camvid_root):
    dataset = CamVid(camvid_root, "train", transform=train_transforms(crop=(64, 96), seed=0), check_sizes=False)
    image, mask = dataset[0]
    assert image.shape == (3, 64, 96) and mask.shape == (64, 96) and mask.dtype == torch.int64


def test_camvid_layout_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CamVid(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="train.txt"):
        CamVid(tmp_path)
    with pytest.raises(ValueError, match="split"):
        CamVid(tmp_path, "trainval")
    (tmp_path / "val.txt").write_text("/SegNet/CamVid/val/a.png /SegNet/CamVid/valannot/a.png\n")
    with pytest.raises(FileNotFoundError, match=r"val[/\\]a\.png"):
        CamVid(tmp_path, "val")
    (tmp_path / "test.txt").write_text("only-one-field.png\n")
    with pytest.raises(ValueError, match="test.txt:1"):
        CamVid(tmp_path, "test")


def test_median_frequency_weights_by_hand():
    masks = [np.array([[0, 0], [1, 255]]), np.array([[1, 1], [2, 2]])]
    # freq: class 0 = 2/3 (only in the first mask, 3 labelled pixels), class 1 = 3/7, class 2 = 2/4; median 1/2.
    weights = median_frequency_weights(masks, num_classes=4)
    np.testing.assert_allclose(weights.numpy(), [0.5 / (2 / 3), 0.5 / (3 / 7), 1.0, 0.0])
    with pytest.raises(ValueError, match="outside"):
        median_frequency_weights([np.array([[5]])], num_classes=4)


@pytest.mark.data
def test_median_frequency_weights_on_camvid_agree_with_segnet_on_which_classes_are_rare(camvid_root):
    weights = median_frequency_weights(CamVid(camvid_root, "train", check_sizes=False), 11)
    published = torch.tensor(CamVid.class_weights, dtype=torch.float64)
    assert torch.equal(weights > 1.001, published > 1)
    assert weights.argmin() == published.argmin() == CamVid.class_names.index("Road")


# Cityscapes


@pytest.mark.data
def test_cityscapes_label_ids_map_to_the_provided_train_ids(data_root):
    dataset = Cityscapes(data_root / "cityscapes_sample", "val")
    assert len(dataset) == 1 and dataset.num_classes == len(dataset.class_names) == 19
    image, mask = dataset[0]
    assert image.shape == (3, 128, 256) and mask.dtype == torch.int64
    train_ids_path = str(dataset.samples[0][1]).replace("_labelIds.png", "_labelTrainIds.png")
    expected = torch.from_numpy(np.array(Image.open(train_ids_path))).long()
    label_ids = torch.from_numpy(np.array(Image.open(dataset.samples[0][1]))).long()
    # The sample's label files were downscaled one by one, so they disagree on a few edge pixels (77 of 32768);
    # for every label id, the train id the provided file gives most often must be the one mapped to.
    assert (mask == expected).float().mean() > 0.995
    for label_id in label_ids.unique():
        assert mask[label_ids == label_id][0] == expected[label_ids == label_id].mode().values, int(label_id)
    assert set(mask.unique().tolist()) == {0, 1, 2, 4, 5, 7, 8, 10, 11, 13, 255}


def test_cityscapes_missing_folders_name_the_path(tmp_path):
    (tmp_path / "leftImg8bit" / "val" / "x").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="gtFine"):
        Cityscapes(tmp_path, "val")
    (tmp_path / "gtFine" / "val").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        Cityscapes(tmp_path, "val")


# COCO


@pytest.mark.data
def test_coco_fruits_nuts(data_root):
    pytest.importorskip("pycocotools", reason="pycocotools not installed: pip install segprune[coco]")
    from segprune.data import COCOSemantic

    root = data_root / "fruits_nuts_coco"
    dataset = COCOSemantic(root / "images", root / "annotations.json")
    assert len(dataset) == 18
    assert dataset.num_classes == 4 and dataset.class_names == ("background", "date", "fig", "hazelnut")
    seen = set()
    for index in (0, 7, 17):
        mask = dataset.load_mask(index)
        assert mask.shape == (600, 800) and (mask > 0).any() and (mask == 0).any()
        assert set(np.unique(mask)) <= {0, 1, 2, 3}  # no crowd annotations in this set
        seen |= set(np.unique(mask))
    assert seen == {0, 1, 2, 3}
    image, mask = dataset[0]
    assert image.shape == (3, 600, 800) and mask.dtype == torch.int64


@pytest.fixture
def coco_tree(tmp_path):
    """A 16x20 image with a large and a small polygon (categories 7 and 3) and a crowd region (category 9)."""
    write_image(tmp_path / "images" / "a.png", rgb(16, 20))
    crowd = np.zeros((16, 20), dtype=np.uint8)
    crowd[12:16, 0:4] = 1
    values = crowd.ravel(order="F")  # uncompressed RLE runs over column-major pixels, starting with zeros
    edges = np.flatnonzero(np.diff(values)) + 1
    counts = np.diff(np.concatenate([[0], edges, [values.size]])).tolist()
    annotation = {
        "images": [{"id": 5, "file_name": "a.png", "width": 20, "height": 16}],
        "categories": [{"id": 7, "name": "big"}, {"id": 3, "name": "small"}, {"id": 9, "name": "crowded"}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 3, "iscrowd": 0, "area": 4, "bbox": [4, 4, 2, 2],
             "segmentation": [[4, 4, 6, 4, 6, 6, 4, 6]]},
            {"id": 2, "image_id": 5, "category_id": 7, "iscrowd": 0, "area": 64, "bbox": [2, 2, 8, 8],
             "segmentation": [[2, 2, 10, 2, 10, 10, 2, 10]]},
            {"id": 3, "image_id": 5, "category_id": 9, "iscrowd": 1, "area": 16, "bbox": [0, 12, 4, 4],
             "segmentation": {"counts": counts, "size": [16, 20]}},
        ],
    }  # fmt: skip
    (tmp_path / "ann.json").write_text(json.dumps(annotation))
    return tmp_path


def test_coco_contiguous_labels_overlap_and_crowd(coco_tree):
    pytest.importorskip("pycocotools", reason="pycocotools not installed: pip install segprune[coco]")
    from segprune.data import COCOSemantic

    dataset = COCOSemantic(coco_tree / "images", coco_tree / "ann.json")
    assert dataset.class_names == ("background", "small", "big", "crowded")  # category ids 3, 7, 9 -> 1, 2, 3
    mask = dataset.load_mask(0)
    assert (mask[12:16, 0:4] == 255).all() and (mask == 255).sum() == 16
    assert mask[5, 5] == 1, "the small instance is painted over the large one it lies in"
    assert mask[3, 3] == 2 and mask[8, 8] == 2
    assert mask[0, 19] == 0 and not (mask == 3).any()


def test_coco_without_pycocotools_names_the_extra(coco_tree, monkeypatch):
    from segprune.data import COCOSemantic

    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(ImportError, match=r"pip install segprune\[coco\]"):
        COCOSemantic(coco_tree / "images", coco_tree / "ann.json")


# VOC


def write_palette_png(path, labels):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="P")
    image.putpalette(np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8).tolist())
    image.save(path)


def test_voc_on_a_fake_tree(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    labels = np.zeros((12, 16), dtype=np.uint8)
    labels[2:6, 3:9], labels[7:, :4], labels[0, :] = 15, 20, 255
    foreign = labels.copy()
    foreign[11, 15] = 42  # not a VOC label: an error naming the file, never silently ignored
    for name, mask in (("2007_000001", foreign), ("2007_000002", labels)):
        write_image(voc / "JPEGImages" / f"{name}.jpg", rgb(12, 16))
        write_palette_png(voc / "SegmentationClass" / f"{name}.png", mask)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000001\n2007_000002\n")

    dataset = VOC(tmp_path, "val")  # the VOCdevkit/VOC2012 folder is found under the root
    assert len(dataset) == 2 and dataset.num_classes == len(dataset.class_names) == 21
    image, mask = dataset[1]
    assert image.shape == (3, 12, 16) and torch.equal(mask, torch.from_numpy(labels.astype(np.int64)))
    with pytest.raises(ValueError, match=r"2007_000001\.png: label value\(s\) 42 are neither a class \(0\.\.20\)"):
        dataset[0]
    assert dataset.class_names[15] == "person"
    with pytest.raises(FileNotFoundError, match=r"Segmentation[/\\]train\.txt"):
        VOC(voc, "train")


# Folders


def test_mask_folder_lists_unpaired_stems(tmp_path):
    for stem in ("a", "b", "c"):
        write_image(tmp_path / "images" / f"{stem}.jpg", rgb(8, 8))
    for stem in ("a", "d"):
        write_image(tmp_path / "masks" / f"{stem}.png", np.zeros((8, 8)))
    with pytest.raises(ValueError, match=r"images without a mask: \[b, c\]; masks without an image: \[d\]"):
        MaskFolder(tmp_path)


def test_mask_folder_infers_classes_and_warns_once_with_mismatch_count(tmp_path):
    for k, (height, width) in enumerate([(8, 10), (8, 10), (8, 10)]):
        write_image(tmp_path / "images" / f"{k}.png", rgb(height, width, seed=k))
    write_image(tmp_path / "masks" / "0.png", np.full((8, 10), 2))
    write_image(tmp_path / "masks" / "1.png", np.array([[0, 4], [255, 1]]).repeat(2, 0).repeat(3, 1))  # 4x6
    write_image(tmp_path / "masks" / "2.png", np.ones((16, 20)))
    with pytest.warns(UserWarning, match="2 of 3 masks differ in size") as record:
        dataset = MaskFolder(tmp_path)
    assert len(record) == 1
    assert dataset.num_classes == 5 and dataset.class_names == ("class0", "class1", "class2", "class3", "class4")
    image, mask = dataset[1]
    assert image.shape == (3, 8, 10) and mask.shape == (8, 10)
    assert set(mask.unique().tolist()) == {0, 1, 4, 255}, "nearest neighbour invents no labels"
    assert mask[0, 0] == 0 and mask[7, 9] == 1
    # Without the scan, the first mismatch met is reported instead.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lazy = MaskFolder(tmp_path, check_sizes=False)
        lazy[0]
    with pytest.warns(UserWarning, match=r"1\.png.*check_sizes=False") as record:
        lazy[1], lazy[2]
    assert len(record) == 1


def test_mask_folder_classes_file_and_out_of_range_label(tmp_path):
    write_image(tmp_path / "images" / "x.png", rgb(4, 4))
    write_image(tmp_path / "masks" / "x.png", np.array([[0, 1], [2, 3]]).repeat(2, 0).repeat(2, 1))
    (tmp_path / "classes.txt").write_text("sky\nroad\n\ncar\nperson\n")
    dataset = MaskFolder(tmp_path, classes_file=tmp_path / "classes.txt")
    assert dataset.class_names == ("sky", "road", "car", "person") and dataset[0][1].max() == 3
    (tmp_path / "classes.txt").write_text("sky\nroad\n")
    with pytest.raises(ValueError, match=r"x\.png: label 3 is not below num_classes=2"):
        MaskFolder(tmp_path, classes_file=tmp_path / "classes.txt")[0]


def test_gray_and_rgba_images_become_rgb(tmp_path):
    write_image(tmp_path / "images" / "gray.png", rgb(6, 5)[..., 0], mode="L")
    write_image(tmp_path / "images" / "rgba.png", np.dstack([rgb(6, 5), np.full((6, 5), 7)]))
    for stem in ("gray", "rgba"):
        write_image(tmp_path / "masks" / f"{stem}.png", np.zeros((6, 5)))
    dataset = MaskFolder(tmp_path)
    assert [Image.open(path).mode for path, _ in dataset.samples] == ["L", "RGBA"]
    gray, _ = dataset[0]
    assert gray.shape == (3, 6, 5)
    raw = (torch.from_numpy(rgb(6, 5)[..., 0]).float() / 255).expand(3, 6, 5)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(gray, (raw - mean) / std)
    assert dataset[1][0].shape == (3, 6, 5)


def test_human_folder_thresholds_at_127(tmp_path):
    write_image(tmp_path / "images" / "p.jpg", rgb(2, 4))
    write_image(tmp_path / "masks" / "p.png", np.array([[0, 127, 128, 255], [255, 0, 200, 100]]))
    write_image(tmp_path / "images" / "q.jpg", rgb(2, 4))
    write_image(tmp_path / "masks" / "q.png", np.full((2, 4, 3), 250))  # RGB mask
    dataset = HumanFolder(tmp_path)
    assert dataset.num_classes == 2 and dataset.class_names == ("background", "person")
    assert dataset[0][1].tolist() == [[0, 0, 1, 1], [1, 0, 1, 0]]
    assert (dataset[1][1] == 1).all()


def test_build_dataset(tmp_path):
    assert isinstance(build_dataset("synthetic", num_samples=2, size=(16, 16)), SyntheticScenes)
    write_image(tmp_path / "images" / "x.png", rgb(4, 4))
    write_image(tmp_path / "masks" / "x.png", np.zeros((4, 4)))
    assert isinstance(build_dataset("human", root=tmp_path), HumanFolder)
    with pytest.raises(ValueError, match="camvid"):
        build_dataset("imagenet")


# Loaders


class Constant(Dataset):
    """The same image and mask at every index, through ``transform``: differences come only from augmentation."""

    def __init__(self, transform, length=4):
        self.transform, self.length = transform, length
        self.image = rgb(12, 12)
        self.mask = np.arange(144).reshape(12, 12) % 7

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return self.transform(self.image, self.mask)


def test_loader_order_fixed_by_seed():
    dataset = SyntheticScenes(num_samples=8, size=(8, 8))

    def order(seed):
        loader = make_loader(torch.utils.data.TensorDataset(torch.arange(8)), batch_size=8, shuffle=True, seed=seed)
        return next(iter(loader))[0].tolist()

    assert order(0) == order(0) and order(0) != order(1) and sorted(order(0)) == list(range(8))
    batch = next(iter(make_loader(dataset, batch_size=4, shuffle=False, seed=0)))
    assert batch[0].shape == (4, 3, 8, 8) and batch[1].shape == (4, 8, 8)


def test_distributed_loader_shards_are_disjoint():
    dataset = torch.utils.data.TensorDataset(torch.arange(10))
    shards = [
        torch.cat([b[0] for b in make_loader(dataset, batch_size=2, shuffle=True, seed=3, distributed=True,
                                             num_replicas=2, rank=rank)]).tolist()
        for rank in (0, 1)
    ]  # fmt: skip
    assert len(shards[0]) == len(shards[1]) == 5 and sorted(shards[0] + shards[1]) == list(range(10))


def test_workers_augment_differently_and_reproducibly():
    def run():
        dataset = Constant(train_transforms(crop=8, scale=(0.6, 1.6), seed=0), length=4)
        loader = make_loader(dataset, batch_size=1, shuffle=False, seed=5, num_workers=2)
        return [mask for _, mask in loader]  # samples 0, 2 from worker 0 and 1, 3 from worker 1

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[1]), "the two workers repeated each other's augmentations"


def test_an_empty_split_is_a_clear_error(tmp_path):
    from segprune.data import build_dataset

    for split in ("train", "val", "test"):
        (tmp_path / split).mkdir()
        (tmp_path / f"{split}annot").mkdir()
        (tmp_path / f"{split}.txt").write_text("")
    with pytest.raises(ValueError, match="no samples found.*'test'"):
        build_dataset("camvid", root=tmp_path, split="test")
