"""Validate a whole dataset up front: every sample is read, and every bad file is reported, not just the first."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch.utils.data import Dataset

from segprune.data.base import MissingSplitError

SPLITS = ("train", "val", "test")


@dataclass
class SplitCheck:
    """What :func:`check_splits` found in one split.

    Attributes:
        split: The split's name.
        samples: How many samples it holds (0 when missing).
        problems: One line per bad sample, naming its file.
        sizes: How many images have each (H, W) after the dataset's transform.
        missing: Why the split is absent (None when it exists).
    """

    split: str
    samples: int = 0
    problems: list[str] = field(default_factory=list)
    sizes: Counter = field(default_factory=Counter)
    missing: str | None = None

    def summary(self) -> str:
        """One line: "train: 290 samples, 2 bad, 3 image sizes" or "test: absent (why)"."""
        if self.missing is not None:
            return f"{self.split}: absent ({self.missing})"
        sizes = f", {len(self.sizes)} image sizes" if len(self.sizes) > 1 else ""
        return f"{self.split}: {self.samples} samples, {len(self.problems)} bad{sizes}"

    def size_note(self, shown: int = 5) -> str | None:
        """For a split of several image sizes, the commonest ones and what that means; None for one size."""
        if len(self.sizes) < 2:
            return None
        common = ", ".join(f"{h}x{w} ({n})" for (h, w), n in self.sizes.most_common(shown))
        more = f" and {len(self.sizes) - shown} more" if len(self.sizes) > shown else ""
        return (f"{self.split}: images of {len(self.sizes)} sizes (H x W: {common}{more}); training crops them to the "
                "recipe's `size`, evaluation runs each at its own size unless `eval_size` is set")


def check_dataset(dataset: Dataset, *, sizes: Counter | None = None) -> list[str]:
    """Read every sample of `dataset`; return one message per bad sample, naming its file where known.

    Args:
        dataset: Returns (image, mask) tensors.
        sizes: If given, counts the (H, W) of every readable image, so mixed sizes can be reported.
    """
    problems = []
    samples = getattr(dataset, "samples", None)
    for i in range(len(dataset)):
        try:
            image, mask = dataset[i]
            if image.shape[-2:] != mask.shape[-2:]:
                raise ValueError(f"image {tuple(image.shape[-2:])} and mask {tuple(mask.shape[-2:])} differ in size")
        except Exception as err:  # noqa: BLE001 - every failure is a finding to report, whatever its type
            problems.append(_finding(samples[i] if samples is not None else (f"sample {i}",), err))
            continue
        if sizes is not None:
            sizes[tuple(image.shape[-2:])] += 1
    return problems


def _finding(sample: tuple, err: Exception) -> str:
    """`image file: message`, or the message alone when it already starts with one of the sample's files."""
    text = str(err)
    return text if any(text.startswith(str(where)) for where in sample) else f"{sample[0]}: {text}"


def check_splits(build: Callable[[str], Dataset], splits: Sequence[str] = SPLITS) -> list[SplitCheck]:
    """Check every split of a dataset that exists: a missing split is noted, not an error.

    Args:
        build: ``build(split)`` returns the split's dataset, or raises :class:`~segprune.data.base.MissingSplitError`
            when the dataset has no such split (a flat folder has no ``test``). Build it with
            ``check_sizes=False`` so that each file is read once, here, and every bad one is reported.
        splits: The splits to look for.

    Raises:
        MissingSplitError: None of ``splits`` exists (the reasons of each are given).
    """
    checks = []
    for split in splits:
        try:
            dataset = build(split)
        except MissingSplitError as err:
            checks.append(SplitCheck(split, missing=str(err)))
            continue
        check = SplitCheck(split, samples=len(dataset))
        check.problems = check_dataset(dataset, sizes=check.sizes)
        checks.append(check)
    if all(c.missing is not None for c in checks):
        raise MissingSplitError("no split found: " + "; ".join(f"{c.split}: {c.missing}" for c in checks))
    return checks
