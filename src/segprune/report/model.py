"""One model's report (a trained checkpoint, no before/after), e.g. of a `segprune train` run or of each
checkpoint folder given to `segprune report`: report.json, report.md and report.html with one value per row.

Why a module of its own: its rows (``MODEL_ROWS``: accuracy, pixel and class accuracy, cost) and its single column
differ from a compression run's; what it shares with the other kinds is in :mod:`segprune.report.common`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from segprune.report import html
from segprune.report.common import (
    ROWS,
    _accuracy_sections,
    _environment_section,
    _finite,
    _guarded_page,
    _markdown_extras,
    _plain_rows,
    _setup,
    enrich,
    per_class_iou,
    read_curves,
    write_atomic,
)

MODEL_ROWS = [("mIoU (%)", "miou", lambda v: f"{100 * v:.2f}"),
              ("foreground IoU (%)", "fg_iou", lambda v: f"{100 * v:.2f}"),
              ("pixel accuracy (%)", "pixel_acc", lambda v: f"{100 * v:.2f}"),
              ("mean class accuracy (%)", "mean_acc", lambda v: f"{100 * v:.2f}"), *ROWS[1:]]


def write_model_report(folder: str | Path, *, title: str, metrics: dict, class_names: Sequence[str] = (),
                       cost: dict | None = None, curves: dict | None = None, recipe: dict | None = None,
                       notes: Sequence[str] = (), split: str | None = None) -> dict:
    """Write report.json, report.md and report.html for one model, e.g. the checkpoint of a `segprune train` run.

    Args:
        folder: Where the three files go (the run folder).
        title: The report's title.
        metrics: What :func:`segprune.eval.metrics.evaluate` returned (`miou`, `iou`, `pixel_acc`, `mean_acc`,
            `fg_iou` for a binary task).
        class_names: The dataset's class names, in label order.
        cost: Optional `params`, `macs`, `size_bytes`, `latency_ms` (and `latency`, its setup) of the model.
        curves: Training curves (see :func:`read_curves`); by default read from the folder's training logs.
        recipe: The run's resolved recipe.
        notes: Lines for the notes section.
        split: The data split the metrics were measured on, shown with them.

    Returns:
        The report as written to report.json.
    """
    folder = Path(folder)
    measured = {k: metrics[k] for k in ("miou", "fg_iou", "pixel_acc", "mean_acc") if k in metrics}
    report = {"title": title, "kind": "model", "split": split, "metrics": measured, "cost": dict(cost or {}),
              "class_names": list(class_names),
              "per_class_iou": per_class_iou({"iou": metrics.get("iou")}, class_names),
              "foreground_iou": _finite(metrics.get("fg_iou")), "curves": curves or read_curves(folder),
              "recipe": recipe or {}, "notes": list(notes)}
    report = enrich(report)
    skipped: list[str] = []
    try:
        sections = _model_sections(report, skipped)
    except Exception as err:  # noqa: BLE001 - see _attempt
        skipped.append(f"report.html incomplete: {type(err).__name__}: {err}")
        sections = []
    report["notes"] = [*report["notes"], *skipped]
    sections.append(html.section("Notes", html.notes(report["notes"])))
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "report.json", json.dumps(report, indent=2) + "\n")
    write_atomic(folder / "report.md", _model_markdown(report))
    write_atomic(folder / "report.html", _guarded_page(title, sections, skipped))
    return report


def _model_rows(report: dict) -> list[tuple[str, str]]:
    values = {**report["metrics"], **report["cost"]}
    return [(label, fmt(values[key])) for label, key, fmt in MODEL_ROWS if _finite(values.get(key)) is not None]


def _model_sections(report: dict, skipped: list[str]) -> list[str]:
    where = f" on the {report['split']} split" if report.get("split") else ""
    lat = report["cost"].get("latency")
    setup = [html.paragraph(f"Latency: {_setup(lat)}.")] if isinstance(lat, dict) else []
    sections = [html.section(f"Accuracy and cost{where}", html.table(["", "value"], _model_rows(report)), *setup),
                *_accuracy_sections({**report, "foreground_iou": None}, skipped)]
    if report.get("recipe"):
        sections.append(html.section("Recipe", html.table(["setting", "value"], _plain_rows(report["recipe"]))))
    return sections + _environment_section(report)


def _model_markdown(report: dict) -> str:
    where = f" ({report['split']} split)" if report.get("split") else ""
    lines = [f"# segprune report: {report['title']}", "", f"| {where.strip(' ()') or 'measure'} | value |",
             "|---|---:|", *[f"| {label} | {value} |" for label, value in _model_rows(report)], ""]
    return "\n".join([*lines, *_markdown_extras({**report, "foreground_iou": None}),
                      *[f"- {note}" for note in report.get("notes", [])], ""])
