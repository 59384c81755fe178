"""Per-epoch training log: ``train.csv`` always, TensorBoard events when ``torch.utils.tensorboard`` imports."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

FIELDS = ("epoch", "step", "loss", "lr", "seconds", "val_miou")  # val_miou: empty when not validated


class EpochLog:
    """Writes the epoch history of a run into ``folder``.

    The CSV is rewritten whole from the history at every epoch (to a temporary file, then renamed), so after a
    resume it holds each epoch exactly once, as the checkpoint recorded it.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._writer = None

    def write(self, history: list[dict]) -> None:
        """Record ``history`` (rows with the keys of ``FIELDS``); its last row is the epoch just finished."""
        self.folder.mkdir(parents=True, exist_ok=True)
        text = io.StringIO()
        rows = csv.DictWriter(text, fieldnames=FIELDS, extrasaction="ignore", lineterminator="\n")
        rows.writeheader()
        rows.writerows(history)
        tmp = self.folder / ".train.csv.tmp"
        tmp.write_text(text.getvalue())
        os.replace(tmp, self.folder / "train.csv")
        self._tensorboard(history[-1])

    def _tensorboard(self, row: dict) -> None:
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                self._writer = False
                return
            self._writer = SummaryWriter(str(self.folder / "tensorboard"))
        if self._writer:
            for key in ("loss", "lr", "seconds", "val_miou"):
                if row.get(key) is not None:
                    self._writer.add_scalar(f"train/{key}", row[key], row["epoch"])
            self._writer.flush()

    def close(self) -> None:
        if self._writer:
            self._writer.close()
