"""The procedural dataset: deterministic, well-formed, balanced enough, instances consistent with masks."""


import numpy as np
import pytest
import torch

from segprune.data.synthetic import SyntheticScenes


@pytest.fixture(scope="module")
def samples():
    ds = SyntheticScenes(num_samples=48, size=(48, 64))
    return [ds.sample(i) for i in range(len(ds))]


def test_same_seed_same_tensors_other_split_or_seed_differs():
    a = SyntheticScenes(num_samples=4, size=(32, 48), seed=3)
    b = SyntheticScenes(num_samples=4, size=(32, 48), seed=3)
    for i in range(4):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    val = SyntheticScenes(num_samples=4, size=(32, 48), seed=3, split="val")
    other_seed = SyntheticScenes(num_samples=4, size=(32, 48), seed=4)
    assert not torch.equal(a[0][0], val[0][0])
    assert not torch.equal(a[0][0], other_seed[0][0])


def test_shapes_dtypes_and_normalisation():
    ds = SyntheticScenes(num_samples=2, size=(40, 56), num_classes=6)
    image, mask = ds[1]
    assert image.shape == (3, 40, 56) and image.dtype == torch.float32
    assert mask.shape == (40, 56) and mask.dtype == torch.int64
    assert 0 <= mask.min() and mask.max() < 6
    assert len(ds.class_names) == 6 and ds.class_names[:2] == ["ground", "sky"]
    raw = ds.sample(1)["image"]
    assert raw.dtype == np.uint8 and raw.shape == (40, 56, 3)
    expected = (raw[5, 7] / 255 - np.array(ds.MEAN)) / np.array(ds.STD)
    np.testing.assert_allclose(image[:, 5, 7].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_every_class_appears_and_none_dominates(samples):
    counts = np.bincount(np.concatenate([s["mask"].ravel() for s in samples]), minlength=6)
    assert len(counts) == 6 and (counts > 0).all()
    assert counts.max() / counts.sum() < 0.7


def test_instances_consistent_with_mask(samples):
    for s in samples:
        instances, mask, labels, boxes = s["instances"], s["mask"], s["labels"], s["boxes"]
        assert instances.dtype == np.int32 and len(labels) == len(boxes) == instances.max()
        assert ((instances > 0) == (mask >= 2)).all()  # object pixels, and only they, belong to an instance
        for k, (label, (x0, y0, x1, y1)) in enumerate(zip(labels, boxes), start=1):
            region = instances == k
            assert region.any() and (mask[region] == label).all()
            ys, xs = np.nonzero(region)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_more_classes_and_bad_arguments():
    ds = SyntheticScenes(num_samples=8, size=(32, 32), num_classes=9)
    masks = np.stack([ds[i][1].numpy() for i in range(8)])
    assert masks.max() < 9 and len(ds.class_names) == 9
    with pytest.raises(ValueError):
        SyntheticScenes(split="holdout")
    with pytest.raises(IndexError):
        ds.sample(8)
