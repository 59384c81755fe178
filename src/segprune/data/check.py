"""Validate a whole dataset up front: every sample is read, and every bad file is reported, not just the first."""

from __future__ import annotations

from torch.utils.data import Dataset


def check_dataset(dataset: Dataset) -> list[str]:
    """Read every sample of `dataset`; return one message per bad sample, naming its file where known."""
    problems = []
    samples = getattr(dataset, "samples", None)
    for i in range(len(dataset)):
        try:
            image, mask = dataset[i]
            if image.shape[-2:] != mask.shape[-2:]:
                raise ValueError(f"image {tuple(image.shape[-2:])} and mask {tuple(mask.shape[-2:])} differ in size")
        except Exception as err:  # noqa: BLE001 - every failure is a finding to report, whatever its type
            where = samples[i][0] if samples is not None else f"sample {i}"
            problems.append(f"{where}: {err}")
    return problems
