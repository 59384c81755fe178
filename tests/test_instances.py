"""Instance data (COCO files, synthetic scenes) and COCO box / mask AP.

The tiny COCO file below holds one of every kind of bad input the loader must count and survive.
"""

import json
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("pycocotools", reason="pycocotools not installed: pip install segprune[coco]")

from pycocotools import mask as mask_api  # noqa: E402

from segprune.data.instances import CocoInstances, instance_collate, make_instance_loader, mask_boxes  # noqa: E402
from segprune.data.synthetic import SyntheticInstances, SyntheticScenes  # noqa: E402
from segprune.eval.coco_metrics import CocoEvaluator, evaluate_instances  # noqa: E402

H, W = 16, 20


def _write_image(path, height, width, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    values = mask.ravel(order="F")  # runs over column-major pixels, starting with zeros
    edges = np.flatnonzero(np.diff(values)) + 1
    return {"counts": np.diff(np.concatenate([[0], edges, [values.size]])).tolist(), "size": list(mask.shape)}


def _rect(y0, y1, x0, x1) -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


RLE_MASK = _rect(10, 14, 12, 18)  # compressed RLE instance
RAW_MASK = _rect(1, 5, 14, 19)  # uncompressed RLE instance


@pytest.fixture
def coco_tree(tmp_path):
    """Image 1 (a.png) with a polygon, a compressed and an uncompressed RLE instance, a crowd region and bad
    annotations; image 2 (b.png) without any; image 3 listed but its file missing."""
    _write_image(tmp_path / "images" / "a.png", H, W)
    _write_image(tmp_path / "images" / "b.png", H, W, seed=1)
    rle = mask_api.encode(np.asfortranarray(RLE_MASK))
    ann = lambda i, image, cat, seg, bbox=None, crowd=0: {  # noqa: E731
        "id": i, "image_id": image, "category_id": cat, "segmentation": seg, "iscrowd": crowd,
        **({} if bbox is None else {"bbox": bbox, "area": bbox[2] * bbox[3]})}
    data = {
        "images": [{"id": i, "file_name": f, "height": H, "width": W} for i, f in ((1, "a.png"), (2, "b.png"),
                                                                                (3, "c.png"))],
        "categories": [{"id": 7, "name": "big"}, {"id": 3, "name": "small"}],
        "annotations": [
            ann(1, 1, 7, [[2, 2, 10, 2, 10, 10, 2, 10]], [2, 2, 8, 8]),
            ann(2, 1, 3, {"size": rle["size"], "counts": rle["counts"].decode()}, [12, 10, 6, 4]),
            ann(3, 1, 7, _uncompressed_rle(RAW_MASK)),  # no bbox: taken from the mask
            ann(4, 1, 3, _uncompressed_rle(_rect(12, 16, 0, 4)), [0, 12, 4, 4], crowd=1),
            ann(5, 1, 7, [[2, 2, 3, 2, 3, 10, 2, 10]], [2, 2, 1, 8]),  # 1 px wide: degenerate box
            ann(6, 1, 7, [[1, 1, 5, 5]]),  # two points: degenerate polygon (pycocotools would read a box)
            ann(7, 1, 7, [[1, 1, 5, 5, 9, 9]]),  # collinear: zero area
            ann(8, 1, 42, [[2, 2, 10, 2, 10, 10, 2, 10]], [2, 2, 8, 8]),  # unknown category
            ann(9, 99, 7, [[2, 2, 10, 2, 10, 10, 2, 10]], [2, 2, 8, 8]),  # unknown image
            ann(10, 3, 7, [[2, 2, 10, 2, 10, 10, 2, 10]], [2, 2, 8, 8]),  # on the image whose file is missing
            ann(11, 1, 3, {"counts": [5, 5], "size": [H + 1, W]}),  # RLE of another size
        ],
    }  # fmt: skip
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path


def _load(tree, **kwargs) -> CocoInstances:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CocoInstances(tree / "images", tree / "ann.json", **kwargs)


def _perfect(target: dict) -> dict:
    """A prediction that is the target itself, every score 1."""
    return {"boxes": target["boxes"], "scores": torch.ones(len(target["labels"])), "labels": target["labels"],
            "masks": target["masks"].bool()}


def _empty_prediction(height, width) -> dict:
    return {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, height, width, dtype=torch.bool)}


# Bad input


def test_bad_input_counted_reported_and_warned_once(coco_tree):
    with pytest.warns(UserWarning, match="dataset.problems") as caught:
        dataset = CocoInstances(coco_tree / "images", coco_tree / "ann.json", size=None)
    assert len([w for w in caught if "CocoInstances" in str(w.message)]) == 1
    counts = dataset.problems.counts()
    assert counts == {"missing_image_file": 1, "unknown_image": 1, "unknown_category": 1, "degenerate_box": 1,
                      "degenerate_polygon": 2, "bad_segmentation": 1, "empty_image": 1, "crowd": 1}
    assert len(dataset.problems) == 8  # crowd regions are information, not problems
    entries = dataset.problems.entries
    assert "image 3" in entries["missing_image_file"][0] and "c.png" in entries["missing_image_file"][0]
    assert "annotation 8" in entries["unknown_category"][0] and "42" in entries["unknown_category"][0]
    assert "annotation 9" in entries["unknown_image"][0]
    assert "annotation 5" in entries["degenerate_box"][0]
    assert {"annotation 6 (image 1)", "annotation 7 (image 1)"} == set(entries["degenerate_polygon"])
    assert "annotation 11" in entries["bad_segmentation"][0]
    assert "image 2" in entries["empty_image"][0]
    assert dataset.image_ids == [1, 2], "the image without a file is dropped, the empty one kept"
    assert [a["id"] for a in dataset.annotations[1]] == [1, 2, 3]


def test_unreadable_image_is_dropped_at_construction(coco_tree):
    (coco_tree / "images" / "b.png").write_bytes(b"not a png")
    dataset = _load(coco_tree, size=None)
    assert dataset.image_ids == [1] and "image 2" in dataset.problems.entries["unreadable_image"][0]
    assert _load(coco_tree, size=None, check_images=False).image_ids == [1, 2]  # then it fails when read


def test_malformed_entries_are_reported_not_raised(coco_tree):
    data = json.loads((coco_tree / "ann.json").read_text())
    good = data["annotations"][0]
    data["annotations"] = [good, "not an annotation", {**good, "id": 21, "bbox": ["a", 2, 8, 8]},
                           {**good, "id": 22, "segmentation": [[2, None, 10, 2, 10, 10, 2, 10]]},
                           {**good, "id": 23, "bbox": [2, 2, float("nan"), 8]}, {**good, "id": 24, "image_id": [1]}]
    (coco_tree / "odd.json").write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = CocoInstances(coco_tree / "images", coco_tree / "odd.json", size=None)
    assert [a["id"] for a in dataset.annotations[1]] == [1]
    malformed = dataset.problems.entries["malformed_annotation"]
    assert len(malformed) == 3 and "entry 'not an annotation'" in malformed[0]
    assert "annotation 21" in malformed[1] and "annotation 24" in malformed[2]
    assert dataset.problems.entries["degenerate_polygon"] == ["annotation 22 (image 1)"]  # a NaN vertex: no area
    assert dataset.problems.entries["degenerate_box"] == ["annotation 23 (image 1)"]
    data["images"][0] = {"id": 1, "file_name": "a.png"}
    (coco_tree / "odd.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="odd.json: image entry .* needs an integer id, height and width"):
        CocoInstances(coco_tree / "images", coco_tree / "odd.json")


def test_clean_file_gives_no_warning(coco_tree):
    data = json.loads((coco_tree / "ann.json").read_text())
    data["images"], data["annotations"] = data["images"][:1], data["annotations"][:3]
    (coco_tree / "clean.json").write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset = CocoInstances(coco_tree / "images", coco_tree / "clean.json")
    assert len(dataset.problems) == 0 and "no problems" in dataset.problems.summary()


def test_unreadable_files_are_clear_errors(coco_tree):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoInstances(coco_tree / "images", coco_tree / "nope.json")
    (coco_tree / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=r"bad.json: not a COCO instances file \(no list annotations, categories"):
        CocoInstances(coco_tree / "images", coco_tree / "bad.json")
    (coco_tree / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json: not a JSON file"):
        CocoInstances(coco_tree / "images", coco_tree / "broken.json")


def test_without_pycocotools_names_the_extra(coco_tree, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    with pytest.raises(ImportError, match=r"pip install segprune\[coco\]"):
        CocoInstances(coco_tree / "images", coco_tree / "ann.json")


# Samples


def test_sample_contract_at_original_size(coco_tree):
    dataset = _load(coco_tree, size=None)
    assert [c["id"] for c in dataset.categories] == [3, 7] and dataset.class_names == ["small", "big"]
    image, target = dataset[0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert set(target) == {"boxes", "labels", "masks", "image_id", "orig_size"}
    assert target["masks"].shape == (3, H, W) and target["masks"].dtype == torch.uint8
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["labels"].tolist() == [1, 0, 1]  # category 7 -> 1, category 3 -> 0
    assert target["image_id"] == 1 and target["orig_size"] == (H, W)
    masks = target["masks"].numpy()
    np.testing.assert_array_equal(masks[0], _rect(2, 10, 2, 10))  # polygon [2, 10) x [2, 10)
    np.testing.assert_array_equal(masks[1], RLE_MASK)
    np.testing.assert_array_equal(masks[2], RAW_MASK)
    assert target["boxes"].tolist() == [[2, 2, 10, 10], [12, 10, 18, 14], [14, 1, 19, 5]]
    assert not masks[:, 12:, :4].any(), "the crowd region is no target"


def test_resized_sample_and_empty_image(coco_tree):
    dataset = _load(coco_tree, size=(32, 40))
    image, target = dataset[0]
    assert image.shape == (3, 32, 40) and target["masks"].shape == (3, 32, 40) and target["orig_size"] == (H, W)
    assert torch.equal(target["boxes"], mask_boxes(target["masks"]))
    assert target["boxes"][0].tolist() == [4, 4, 20, 20]  # exactly twice the original box
    image, target = dataset[1]
    assert image.shape == (3, 32, 40) and target["image_id"] == 2
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 32, 40) and target["labels"].shape == (0,)


def test_flip_moves_masks_and_boxes_together(coco_tree):
    plain = _load(coco_tree, size=(24, 30))
    flipped = _load(coco_tree, size=(24, 30), train=True, flip=1.0)
    (image, target), (image_f, target_f) = plain[0], flipped[0]
    assert torch.equal(image_f, image.flip(-1)) and torch.equal(target_f["masks"], target["masks"].flip(-1))
    assert torch.equal(target_f["boxes"], mask_boxes(target_f["masks"]))
    mirrored = torch.stack([30 - target["boxes"][:, 2], target["boxes"][:, 1], 30 - target["boxes"][:, 0],
                            target["boxes"][:, 3]], dim=1)
    assert torch.equal(target_f["boxes"], mirrored)


def test_seeded_loader_collates_targets_as_a_list(coco_tree):
    dataset = _load(coco_tree, size=(24, 30), train=True, seed=0)
    order = []
    for _ in range(2):
        images, targets = next(iter(make_instance_loader(dataset, batch_size=2, shuffle=True, seed=5)))
        assert images.shape == (2, 3, 24, 30) and isinstance(targets, list) and len(targets) == 2
        order.append([t["image_id"] for t in targets])
    assert order[0] == order[1] and sorted(order[0]) == [1, 2]
    with pytest.raises(ValueError, match="differ in size"):
        instance_collate([(torch.zeros(3, 4, 4), {}), (torch.zeros(3, 4, 5), {})])


# Synthetic instances


def test_synthetic_instances_contract_and_determinism():
    a = SyntheticInstances(num_samples=3, size=(40, 56), num_classes=4, seed=2)
    b = SyntheticInstances(num_samples=3, size=(40, 56), num_classes=4, seed=2)
    scenes = SyntheticScenes(num_samples=3, size=(40, 56), num_classes=6, seed=2)
    assert a.num_classes == 4 and a.class_names == scenes.class_names[2:]
    for i in range(3):
        (image, target), (image_b, target_b) = a[i], b[i]
        assert torch.equal(image, image_b) and torch.equal(target["masks"], target_b["masks"])
        torch.testing.assert_close(image, scenes[i][0], rtol=1e-5, atol=1e-5)  # the semantic scenes' pixels
        sample = scenes.sample(i)
        assert target["labels"].tolist() == (sample["labels"] - 2).tolist()
        assert 0 <= target["labels"].min() and target["labels"].max() < 4
        assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (len(sample["labels"]), 40, 56)
        np.testing.assert_array_equal(target["boxes"].numpy(), sample["boxes"])
        assert torch.equal(target["boxes"], mask_boxes(target["masks"]))
        # every object pixel of the semantic mask belongs to exactly one instance of the same class
        painted = (target["masks"].numpy() * (target["labels"].numpy() + 2)[:, None, None]).sum(0)
        np.testing.assert_array_equal(np.where(sample["mask"] >= 2, sample["mask"], 0), painted)
        assert target["image_id"] == i and target["orig_size"] == (40, 56)
    other = SyntheticInstances(num_samples=3, size=(40, 56), seed=3)
    assert not torch.equal(other[0][0], a[0][0])
    cached = SyntheticInstances(num_samples=3, size=(40, 56), num_classes=4, seed=2, cache=True)
    for _ in range(2):  # drawn, then from the cache
        assert all(torch.equal(cached[i][0], a[i][0]) and torch.equal(cached[i][1]["masks"], a[i][1]["masks"])
                   for i in range(3))
    assert cached.coco_dict() == a.coco_dict()


def test_synthetic_training_flips_are_seeded():
    flips = []
    for _ in range(2):
        dataset = SyntheticInstances(num_samples=6, size=(32, 40), seed=1, train=True)
        plain = SyntheticInstances(num_samples=6, size=(32, 40), seed=1)
        flips.append([torch.equal(dataset[i][0], plain[i][0].flip(-1)) for i in range(6)])
    assert flips[0] == flips[1] and any(flips[0]) and not all(flips[0])


# COCO metrics


def test_perfect_predictions_score_one_and_worse_ones_less():
    dataset = SyntheticInstances(num_samples=4, size=(48, 64), split="val")
    targets = [dataset[i][1] for i in range(len(dataset))]
    perfect = evaluate_instances([_perfect(t) for t in targets], dataset)
    assert perfect["bbox"]["AP"] == 1.0 and perfect["segm"]["AP"] == 1.0
    streamed = CocoEvaluator(dataset)  # image by image, as evaluate_model feeds it
    for target in targets:
        streamed.add(target["image_id"], _perfect(target))
    assert streamed.compute() == perfect
    assert perfect["bbox"]["AP50"] == 1.0 and perfect["segm"]["AP75"] == 1.0
    shifted = [dict(_perfect(t), boxes=t["boxes"] + 2, masks=t["masks"].bool().roll(2, -1)) for t in targets]
    worse = evaluate_instances(shifted, dataset)
    assert worse["bbox"]["AP"] < 0.9 and worse["segm"]["AP"] < 0.9
    wrong_class = [dict(_perfect(t), labels=(t["labels"] + 1) % 4) for t in targets]
    assert evaluate_instances(wrong_class, dataset)["segm"]["AP"] < 0.5
    empty = evaluate_instances([_empty_prediction(48, 64) for _ in targets], dataset)
    assert empty["bbox"]["AP"] == 0.0 and empty["segm"]["AP"] == 0.0


def test_predictions_mapped_back_to_original_size_and_category_ids(coco_tree):
    dataset = _load(coco_tree, size=(32, 40))  # 2x the annotated frame; crowd region and empty image present
    predictions = [_perfect(dataset[i][1]) for i in range(len(dataset))]
    metrics = evaluate_instances(predictions, dataset)
    assert metrics["bbox"]["AP"] == 1.0 and metrics["segm"]["AP"] == 1.0
    # a subset, keyed by image id: only image 1 is evaluated
    subset = evaluate_instances({1: predictions[0]}, dataset, iou_types=("segm",))
    assert set(subset) == {"segm"} and subset["segm"]["AP"] == 1.0
    # a detection on the crowd region, ranked first, is ignored, not a false positive
    crowd = dict(predictions[0], scores=torch.full((3,), 0.5))
    crowd_mask = torch.zeros(1, 32, 40, dtype=torch.bool)
    crowd_mask[0, 24:32, 0:8] = True
    crowd = {"boxes": torch.cat([crowd["boxes"], torch.tensor([[0.0, 24, 8, 32]])]),
             "scores": torch.cat([crowd["scores"], torch.ones(1)]),
             "labels": torch.cat([crowd["labels"], torch.zeros(1, dtype=torch.int64)]),
             "masks": torch.cat([crowd["masks"], crowd_mask])}
    assert evaluate_instances({1: crowd}, dataset)["segm"]["AP"] == 1.0


def test_bad_predictions_are_clear_errors(coco_tree):
    dataset = _load(coco_tree, size=None)
    bad_label = dict(_perfect(dataset[0][1]), labels=torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="label 5 outside 0..1"):
        evaluate_instances({1: bad_label}, dataset)
    with pytest.raises(ValueError, match="image id 77"):
        evaluate_instances({77: _empty_prediction(H, W)}, dataset)


# The real fruits set


@pytest.mark.data
def test_fruits_nuts(data_root):
    root = data_root / "fruits_nuts_coco"
    raw = json.loads((root / "annotations.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean file: no problem warning
        dataset = CocoInstances(root / "images", root / "annotations.json", size=None)
    assert len(dataset) == len(raw["images"]) == 18 and dataset.class_names == ["date", "fig", "hazelnut"]
    reference = {a["id"]: a["bbox"] for a in raw["annotations"]}
    total, predictions = 0, []
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert image.shape == (3, 600, 800) and target["masks"].shape[1:] == (600, 800)
        anns = dataset.annotations[target["image_id"]]
        assert len(anns) == len(target["labels"])
        for ann, box in zip(anns, target["boxes"]):
            x, y, w, h = reference[ann["id"]]
            np.testing.assert_allclose(box.numpy(), [x, y, x + w, y + h], atol=1.5)
        total += len(anns)
        predictions.append(_perfect(target))
    assert total == len(raw["annotations"]) == 165
    metrics = evaluate_instances(predictions, dataset)
    assert metrics["segm"]["AP"] == 1.0 and metrics["bbox"]["AP"] > 0.95


@pytest.mark.data
def test_fruits_nuts_resized_batch(data_root):
    root = data_root / "fruits_nuts_coco"
    dataset = CocoInstances(root / "images", root / "annotations.json", size=(138, 184), train=True, seed=0)
    images, targets = next(iter(make_instance_loader(dataset, batch_size=2, shuffle=False, seed=0)))
    assert images.shape == (2, 3, 138, 184)
    for target in targets:
        assert target["masks"].shape[1:] == (138, 184) and len(target["boxes"]) > 0
        assert torch.equal(target["boxes"], mask_boxes(target["masks"]))


# segprune check


def test_cli_check_reports_every_problem(coco_tree, capsys):
    from segprune.cli import main

    assert main(["check", "--task", "instance", "--data", f"coco:{coco_tree / 'images'}:{coco_tree / 'ann.json'}"]) == 2
    out = capsys.readouterr()
    assert "unknown_category: annotation 8" in out.out and "missing_image_file: image 3" in out.out
    assert "2 images, 0 unreadable, 7 annotation problem(s)" in out.out and "7 annotation problem(s)" in out.err
    (coco_tree / "images" / "b.png").write_bytes(b"not a png")
    data = json.loads((coco_tree / "ann.json").read_text())
    data["images"], data["annotations"] = data["images"][:2], data["annotations"][:4]
    (coco_tree / "clean.json").write_text(json.dumps(data))
    spec = f"coco:{coco_tree / 'images'}:{coco_tree / 'clean.json'}"
    assert main(["check", "--task", "instance", "--data", spec]) == 2
    assert "unreadable_image: image 2: " in capsys.readouterr().out  # found from its header, at construction
    _write_image(coco_tree / "images" / "b.png", H, W)
    assert main(["check", "--task", "instance", "--data", spec]) == 0
    assert main(["check", "--task", "instance", "--data", "synthetic"]) == 0
    assert "synthetic: 64 images, 0 unreadable, 0 annotation problem(s)" in capsys.readouterr().out


# Training and evaluating YOLACT on the shared loop


def _tiny_recipe(**overrides):
    from segprune.workflows import recipe_from

    settings = dict(model="test_yolact", width=0.0625, size=[48, 64], train_samples=8, val_samples=4, batch_size=4,
                    epochs=2, threads=1, lr=0.003, **overrides)
    return recipe_from(None, {k: json.dumps(v) if isinstance(v, list) else v for k, v in settings.items()})


def _yolact(num_classes=4):
    pytest.importorskip("segprune.models.yolact", reason="the YOLACT model is not in this tree")
    from segprune.models import create_model

    torch.manual_seed(0)
    return create_model("test_yolact", num_classes=num_classes, width=0.0625)


def test_short_training_lowers_the_yolact_loss():
    model = _yolact()
    from segprune.models.yolact import YolactLoss
    from segprune.models.yolact_loss import InstanceLoss
    from segprune.train.loop import fit

    dataset = SyntheticInstances(num_samples=4, size=(48, 64))
    loader = make_instance_loader(dataset, batch_size=4, shuffle=True, seed=0, drop_last=True)
    loss_fn = InstanceLoss(model, YolactLoss(4))
    losses = fit(model, loader, epochs=8, lr=0.01, optimizer="adamw", progress=False, loss_fn=loss_fn)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]  # training lowers the training loss
    assert set(loss_fn.parts) == {"box", "conf", "mask", "seg"}


class _Killed(SyntheticInstances):
    """Synthetic instances whose loading dies (like a killed process) after ``fail_after`` samples."""

    def __init__(self, fail_after=None, **kwargs):
        super().__init__(**kwargs)
        self.fail_after, self.fetched = fail_after, 0

    def __getitem__(self, index):
        self.fetched += 1
        if self.fail_after is not None and self.fetched > self.fail_after:
            raise KeyboardInterrupt
        return super().__getitem__(index)


def test_interrupted_instance_training_resumes_exactly(tmp_path):
    _yolact()
    from segprune.models.yolact import YolactLoss
    from segprune.models.yolact_loss import InstanceLoss
    from segprune.train.loop import fit
    from segprune.train.resume import Checkpoints

    def run(folder, fail_after=None, resume=False):
        net = _yolact()
        dataset = _Killed(fail_after, num_samples=4, size=(32, 40), train=True, seed=3)  # seeded flips
        loader = make_instance_loader(dataset, batch_size=2, shuffle=True, seed=1, drop_last=True)
        fit(net, loader, epochs=2, lr=0.003, optimizer="adamw", progress=False, resume=resume,
            loss_fn=InstanceLoss(net, YolactLoss(4)), checkpoints=Checkpoints(folder, every=1))
        return net

    straight = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", fail_after=6)  # dies in the second batch of epoch 2
    resumed = run(tmp_path / "b", resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_bfloat16_autocast_keeps_the_loss_in_float32():
    model = _yolact()
    from segprune.models.yolact import YolactLoss
    from segprune.models.yolact_loss import InstanceLoss

    images, targets = instance_collate([SyntheticInstances(num_samples=2, size=(32, 40))[i] for i in range(2)])
    model.train()
    loss_fn = InstanceLoss(model, YolactLoss(4))
    full = loss_fn(model(images), targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(images)
        loss = loss_fn(output, targets)  # the mask BCE would refuse to run in low precision
    assert output["cls"].dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert torch.isfinite(loss) and abs(loss.item() - full.item()) < 0.05 * full.item()
    loss.backward()  # runs; gradient values are not asserted: some CPU bf16 conv kernels give NaN weight gradients
    assert model.head.cls.weight.grad is not None  # on 1x1 feature maps, not reproducibly (torch's, not ours)


def test_evaluate_model_scores_postprocessed_predictions():
    model = _yolact()
    from segprune.eval.instances import evaluate_model, predict_instances

    dataset = SyntheticInstances(num_samples=3, size=(32, 40), split="val")
    loader = make_instance_loader(dataset, batch_size=2, shuffle=False, seed=0)
    predictions = predict_instances(model, loader, score_thresh=0.0)
    assert sorted(predictions) == [0, 1, 2] and model.training
    for prediction in predictions.values():
        assert prediction["masks"].dtype == torch.bool and prediction["masks"].shape[1:] == (32, 40)
    metrics = evaluate_model(model, torch.utils.data.Subset(dataset, [0, 1]), batch_size=2)
    assert 0.0 <= metrics["segm"]["AP"] < 0.5 and 0.0 <= metrics["bbox"]["AP"] < 0.5  # untrained


def test_predictions_in_the_original_frame(coco_tree):
    model = _yolact(num_classes=2)
    from segprune.eval.instances import predict_instances

    loader = make_instance_loader(_load(coco_tree, size=(32, 40)), batch_size=2, shuffle=False, seed=0)
    resized = predict_instances(model, loader, score_thresh=0.0)
    original = predict_instances(model, loader, score_thresh=0.0, original_size=True)
    assert sorted(original) == [1, 2]
    for image_id, prediction in original.items():
        assert prediction["masks"].shape[1:] == (H, W) and resized[image_id]["masks"].shape[1:] == (32, 40)
        torch.testing.assert_close(prediction["boxes"], resized[image_id]["boxes"] / 2)  # the same detections


def test_cli_trains_and_evaluates_an_instance_model(tmp_path, coco_tree, capsys):
    _yolact()
    from segprune.cli import main

    out = tmp_path / "run"
    common = ["--model", "test_yolact", "--out", str(out), "--quiet", "--set", "width=0.0625",
              "--set", "size=[32,40]", "--set", "batch_size=2", "--set", "threads=1", "--set", "method=l1"]
    data = f"coco:{coco_tree / 'images'}:{coco_tree / 'ann.json'}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tree's bad annotations are reported, and skipped
        assert main(["train", "--task", "instance", "--data", data, "--set", "epochs=1", *common]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert set(metrics) == {"bbox", "segm"} and 0 <= metrics["segm"]["AP"] <= 1
        assert main(["eval", str(out / "model"), "--data", data]) == 0
    printed = capsys.readouterr().out
    assert "mask AP" in printed and "box  AP" in printed
    pruned, tuned = tmp_path / "pruned", tmp_path / "tuned"
    assert main(["prune", str(out / "model"), "--ratio", "0.3", "--size", "32", "40", "--out", str(pruned)]) == 0
    assert "removed" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["finetune", str(pruned), "--out", str(tuned), "--quiet", "--set", "finetune_epochs=1"]) == 0
        assert main(["eval", str(tuned), "--data", data]) == 0
    assert "mask AP" in capsys.readouterr().out
    assert main(["train", "--task", "instance", "--data", "synthetic", *common]) == 2  # the folder is in use
    assert "already holds checkpoints" in capsys.readouterr().err


def test_slimming_penalises_the_prunable_bn_scales_and_cap_is_refused():
    model = _yolact()
    from segprune.workflows.tasks import task_of
    from segprune.workflows.train import training_regularizer

    regularizer = training_regularizer(_tiny_recipe(method="slimming"), task_of("instance"), model)
    names = [name for name, _ in regularizer.norms]
    assert names and all(name.startswith("backbone.") for name in names)  # only the backbone has BN
    assert training_regularizer(_tiny_recipe(method="l1"), task_of("instance"), model) is None
    with pytest.raises(ValueError, match="cap"):
        training_regularizer(_tiny_recipe(method="cap"), task_of("instance"), model)


@pytest.mark.slow
@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with the gloo backend is not available in this build")
def test_instance_training_under_torchrun(tmp_path):
    """Two gloo processes: the shards train together, rank 0 alone evaluates (COCOeval) and writes, none hangs."""
    import os
    import subprocess

    _yolact()
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
               "-m", "segprune.cli", "train", "--task", "instance", "--model", "test_yolact", "--data", "synthetic",
               "--out", str(out), "--quiet", "--set", "width=0.0625", "--set", "size=[32,40]", "--set", "method=l1",
               "--set", "batch_size=4", "--set", "epochs=1", "--set", "train_samples=8", "--set", "val_samples=2",
               "--set", "threads=1"]
    done = subprocess.run(command, env={**env, "OMP_NUM_THREADS": "1"}, cwd=tmp_path, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    log = (out / "log.txt").read_text()
    assert "2 process(es)" in log and log.count("mask AP") == 1
    assert set(json.loads((out / "metrics.json").read_text())) == {"bbox", "segm"}
    assert (out / "checkpoints" / "latest").read_text() == "step-0000002"  # 8 images, global batch 4
