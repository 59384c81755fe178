"""Joint transforms: image and mask move together, padding is ignored, seeds fix everything, statistics are right."""

import numpy as np
import pytest
import torch
from PIL import Image

from segprune.data.base import IMAGENET_MEAN, IMAGENET_STD, normalise
from segprune.data.transforms import (
    ColorJitter,
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    Resize,
    ToTensor,
    eval_transforms,
    mean_pixel,
    train_transforms,
)


def coded_pair(height=20, width=24):
    """An image whose red channel repeats the mask, so any misalignment between the two shows."""
    mask = (np.arange(height * width).reshape(height, width) * 7) % 200
    image = np.stack([mask, np.full_like(mask, 50), np.full_like(mask, 90)], axis=-1).astype(np.uint8)
    return image, mask


def assert_aligned(image, mask):
    image, mask = np.asarray(image), np.asarray(mask)
    valid = mask != 255
    assert valid.any()
    np.testing.assert_array_equal(image[..., 0][valid], mask[valid])


def test_same_seed_same_augmentations_and_reseed_restarts():
    image, mask = coded_pair()

    def outputs(pipeline, n=4):
        return [pipeline(Image.fromarray(image), mask) for _ in range(n)]

    a = outputs(train_transforms(crop=16, jitter=0.3, seed=7))
    b = outputs(train_transforms(crop=16, jitter=0.3, seed=7))
    c = outputs(train_transforms(crop=16, jitter=0.3, seed=8))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(a, c))
    assert not torch.equal(a[0][1], a[1][1]), "successive calls draw new augmentations"
    pipeline = train_transforms(crop=16, jitter=0.3, seed=7)
    outputs(pipeline, 2)
    pipeline.reseed(7)
    assert torch.equal(outputs(pipeline, 1)[0][1], a[0][1])


def test_global_generator_when_unseeded():
    image, mask = coded_pair()
    pipeline = train_transforms(crop=16)
    assert pipeline.generators() == []
    torch.manual_seed(0)
    first = pipeline(image, mask)
    torch.manual_seed(0)
    assert torch.equal(pipeline(image, mask)[1], first[1])


def test_crop_pads_mask_with_255_and_image_with_fill():
    image, mask = coded_pair(10, 12)
    crop = RandomCrop((16, 14), fill=mean_pixel(), generator=torch.Generator().manual_seed(0))
    out_image, out_mask = crop(image, mask)
    assert out_image.shape == (16, 14, 3) and out_mask.shape == (16, 14)
    # The input is smaller than the crop in both directions, so the window is the padded input itself.
    np.testing.assert_array_equal(out_mask[:10, :12], mask)
    assert (out_mask[10:, :] == 255).all() and (out_mask[:, 12:] == 255).all()
    assert (out_image[10:, :] == mean_pixel()).all() and (out_image[:, 12:] == mean_pixel()).all()
    normalised, _ = Normalize()(*ToTensor()(out_image, out_mask))
    assert normalised[:, 12:, :].abs().max() < 0.01, "padding with the mean pixel normalises to about zero"


def test_crop_window_is_aligned_and_inside():
    image, mask = coded_pair(20, 24)
    crop = RandomCrop(8, generator=torch.Generator().manual_seed(1))
    corners = set()
    for _ in range(10):
        out_image, out_mask = crop(image, mask)
        assert out_mask.shape == (8, 8) and (out_mask != 255).all()
        assert_aligned(out_image, out_mask)
        found = [(t, c) for t in range(13) for c in range(17) if np.array_equal(mask[t : t + 8, c : c + 8], out_mask)]
        assert found, "the crop is a window of the input"
        corners.add(found[0])
    assert len(corners) > 1


def test_flip_flips_both():
    image, mask = coded_pair()
    flipped_image, flipped_mask = RandomHorizontalFlip(p=1.0)(image, mask)
    np.testing.assert_array_equal(flipped_image, image[:, ::-1])
    np.testing.assert_array_equal(flipped_mask, mask[:, ::-1])
    same_image, same_mask = RandomHorizontalFlip(p=0.0)(image, mask)
    np.testing.assert_array_equal(same_image, image)
    np.testing.assert_array_equal(same_mask, mask)
    flip = RandomHorizontalFlip(generator=torch.Generator().manual_seed(0))
    flips = []
    for _ in range(20):
        out_image, out_mask = flip(image, mask)
        assert_aligned(out_image, out_mask)
        flips.append(out_mask[0, 0] == mask[0, -1])
    assert 0 < sum(flips) < 20


def test_scale_keeps_labels_and_range():
    image, mask = coded_pair(20, 24)
    scale = RandomScale((0.5, 2.0), generator=torch.Generator().manual_seed(0))
    heights = []
    for _ in range(10):
        out_image, out_mask = scale(image, mask)
        assert out_image.shape[:2] == out_mask.shape and 10 <= out_mask.shape[0] <= 40
        assert set(np.unique(out_mask)) <= set(np.unique(mask)), "nearest neighbour invents no labels"
        heights.append(out_mask.shape[0])
    assert len(set(heights)) > 3
    assert Resize((5, 6))(image, mask)[1].shape == (5, 6)


def test_colour_jitter_touches_the_image_only():
    image, mask = coded_pair()
    jitter = ColorJitter(0.4, 0.4, 0.4, 0.1, generator=torch.Generator().manual_seed(0))
    out_image, out_mask = jitter(image, mask)
    assert out_image.dtype == np.uint8 and out_image.shape == image.shape
    assert not np.array_equal(out_image, image)
    np.testing.assert_array_equal(out_mask, mask)
    np.testing.assert_array_equal(ColorJitter()(image, mask)[0], image)
    grey = np.full((4, 4, 3), 100, dtype=np.uint8)  # saturation and hue leave grey alone
    np.testing.assert_array_equal(ColorJitter(saturation=0.9, hue=0.5)(grey, mask[:4, :4])[0], grey)


def test_normalise_statistics():
    image = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    mask = np.zeros((32, 40), dtype=np.int64)
    tensor, out_mask = eval_transforms()(Image.fromarray(image), mask)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 32, 40) and out_mask.dtype == torch.int64
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    np.testing.assert_allclose(tensor.mean((1, 2)), (image.mean((0, 1)) / 255 - mean) / std, rtol=1e-4)
    np.testing.assert_allclose(tensor.std((1, 2), correction=0), image.std((0, 1)) / 255 / std, rtol=1e-4)
    default, _ = normalise(Image.fromarray(image), mask)  # a dataset's default matches eval_transforms
    torch.testing.assert_close(default, tensor)
    unit = ToTensor()(image, mask)[0]
    assert unit.min() >= 0 and unit.max() <= 1 and unit[0, 3, 4] == image[3, 4, 0] / 255


def test_train_transforms_output_contract():
    image, mask = coded_pair(30, 20)
    pipeline = train_transforms(crop=(24, 32), scale=(0.5, 1.5), seed=0)
    out_image, out_mask = pipeline(Image.fromarray(image), torch.from_numpy(mask))
    assert out_image.shape == (3, 24, 32) and out_image.dtype == torch.float32
    assert out_mask.shape == (24, 32) and out_mask.dtype == torch.int64
    assert (out_mask == 255).any(), "20 columns scaled by at most 1.5 need padding to 32"


def test_misuse_is_reported():
    image, mask = coded_pair()
    with pytest.raises(TypeError, match="after ToTensor"):
        Normalize()(image, mask)
    with pytest.raises(TypeError, match="before ToTensor"):
        RandomCrop(4)(torch.zeros(3, 20, 24), mask)
    with pytest.raises(ValueError, match="differ in size"):
        RandomCrop(4)(image, mask[:10])
    nested = Compose([Compose([RandomCrop(4, generator=torch.Generator())]), RandomScale(generator=torch.Generator())])
    assert len(nested.generators()) == 2
