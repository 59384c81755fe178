"""What the three kinds of report share: a compression run's (:mod:`segprune.report.run`), one model's
(:mod:`segprune.report.model`) and several runs' (:mod:`segprune.report.combined`).

Why a module of its own: the three kinds write the same three files (``FILES``) from the same rows, sections and
safeguards, so those live here once: the table rows and the accuracy a report is judged by (``accuracy_of`` and
``rows_of`` are the only two places that read a report's `"task"`), what every report gains, the Markdown extras,
the guarded plots and page, and the atomic write (`write_atomic`, which the workflows' output files use too).
The underscored names are the report floor's own, shared by its three writers; nothing outside `report/` uses them.

Every report gains, where its data allows: `per_class_iou` (one row per class, with its name when known),
`foreground_iou` (binary tasks), `curves` (loss and validation mIoU per epoch, from the `train.csv` /
`finetune.csv` logs in the folder unless the report brings its own) and `environment` (see
:func:`segprune.report.environment.environment`).

Report generation never fails a finished run: a plot that cannot be drawn (matplotlib missing, or any error)
becomes a note in all three files instead.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from segprune.report import html, plots
from segprune.report.environment import environment

ROWS = [("mIoU (%)", "miou", lambda v: f"{100 * v:.2f}"),
        ("params", "params", lambda v: f"{v:,}"),
        ("MACs", "macs", lambda v: f"{v / 1e6:,.1f} M"),
        ("weights file", "size_bytes", lambda v: f"{v / 1024:,.1f} KiB"),
        ("latency (median)", "latency_ms", lambda v: f"{v:.2f} ms")]
# An instance (YOLACT) report: COCO box and mask AP in place of mIoU, the same cost rows.
INSTANCE_ROWS = [("box AP (%)", "box_ap", lambda v: f"{100 * v:.2f}"),
                 ("mask AP (%)", "mask_ap", lambda v: f"{100 * v:.2f}"),
                 ("mask AP50 (%)", "mask_ap50", lambda v: f"{100 * v:.2f}"),
                 ("mask AP75 (%)", "mask_ap75", lambda v: f"{100 * v:.2f}"), *ROWS[1:]]
COST_KEYS = [key for _, key, _ in ROWS[1:]]
# A report's rows and accuracy (key, label), by the task it records ("task"; none: semantic). The workflows' Tasks
# read theirs here, so a report.json read back renders without them; register_task adds a new task's.
REPORT_TASKS = {None: (ROWS, ("miou", "mIoU (%)")), "instance": (INSTANCE_ROWS, ("mask_ap", "mask AP (%)"))}
NO_MATPLOTLIB = "matplotlib not installed (pip install segprune[report])"
FILES = ("report.json", "report.md", "report.html")
CURVE_LOGS = (("train", "train.csv"), ("fine-tune", "finetune.csv"))  # stage, training log in the run folder


def accuracy_of(report: dict) -> tuple[str, str]:
    """The accuracy a report is judged by, as (key, label): mask AP for an instance run, else mIoU."""
    return REPORT_TASKS.get(report.get("task"), REPORT_TASKS[None])[1]


def _ratio(before: float, after: float) -> float:
    return after / before if before else float("nan")


def rows_of(report: dict) -> list:
    """The table rows of a report: those of the task it records (INSTANCE_ROWS for instance), else ROWS (mIoU)."""
    return REPORT_TASKS.get(report.get("task"), REPORT_TASKS[None])[0]


def table(before: dict, after: dict, *, rows=None) -> str:
    """A Markdown before/after table with the after/before ratio of every row (`rows`: ROWS by default)."""
    lines = ["| | before | after | after / before |", "|---|---:|---:|---:|"]
    for label, key, fmt in rows or ROWS:
        lines.append(f"| {label} | {fmt(before[key])} | {fmt(after[key])} | {_ratio(before[key], after[key]):.3f} |")
    return "\n".join(lines)


# --- what the writers share: Markdown extras, the latency setup, guarded plots and page -------------------------------
def _markdown_extras(report: dict) -> list[str]:
    """The per-class IoU table, the foreground IoU and the environment, as Markdown lines."""
    lines = []
    fg = report.get("foreground_iou")
    if isinstance(fg, dict):
        lines += [f"Foreground IoU: {_percent(fg.get('before'))} -> {_percent(fg.get('after'))} %", ""]
    elif fg is not None:
        lines += [f"Foreground IoU: {_percent(fg)} %", ""]
    header, rows = _class_table(report.get("per_class_iou") or [])
    if rows:
        lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    for stage, c in (report.get("curves") or {}).items():
        miou = c.get("val_miou") or [None] * len(c["epoch"])
        lines += [f"Training curve ({stage}):", "", "| epoch | loss | validation mIoU (%) |", "|---:|---:|---:|",
                  *[f"| {e} | {loss:.4f} | {_percent(m)} |" for e, loss, m in zip(c["epoch"], c["loss"], miou)], ""]
    env = report.get("environment")
    if env:
        lines += ["Environment: " + ", ".join(f"{k} {v}" for k, v in env.items() if v is not None), ""]
    return lines


def _setup(lat: dict) -> str:
    get = lambda key: lat.get(key, "?")
    return f"{get('device')}, {get('dtype')}, batch {get('batch')}, input {get('input_size')}, {get('threads')} threads"


def _attempt(name: str, draw: Callable[[], bytes], skipped: list[str]) -> bytes | None:
    """`draw()`, or None with a note in `skipped` when it fails for any reason."""
    try:
        return draw()
    except ImportError:
        skipped.append(f"plot {name} skipped: {NO_MATPLOTLIB}")
    except Exception as err:  # noqa: BLE001 - a plot must never fail a finished run; the note says what went wrong
        skipped.append(f"plot {name} skipped: {type(err).__name__}: {err}")
    return None


def _figures(items: Sequence[tuple[str, Callable[[], bytes]]], skipped: list[str]) -> list[str]:
    """HTML figures of the plots that could be drawn, captioned by name."""
    out = []
    for name, draw in items:
        png = _attempt(name, draw, skipped)
        if png is not None:
            out.append(html.figure(png, name))
    return out


def _guarded_page(title: str, sections: list[str], skipped: list[str]) -> str:
    """The page; should assembling it fail, a page that says so (the run's numbers are in report.json)."""
    try:
        return html.page(f"segprune report: {title}", sections)
    except Exception as err:  # noqa: BLE001 - see _attempt
        skipped.append(f"report.html incomplete: {type(err).__name__}: {err}")
        return html.page("segprune report", [html.notes(skipped, css="note")])


# --- what every report gains: per-class IoU, foreground IoU, curves, environment ---------------------------------
def enrich(report: dict, folder: str | Path | None = None) -> dict:
    """``report`` with `per_class_iou`, `foreground_iou`, `curves` (from ``folder``'s training logs) and
    `environment` added where it has the data and does not already hold them (a copy; ``report`` is unchanged)."""
    report = dict(report)
    names = report.get("class_names") or ()
    sides = {side: report[side] for side in ("before", "after") if isinstance(report.get(side), dict)}
    if "per_class_iou" not in report and any("iou" in row for row in sides.values()):
        report["per_class_iou"] = per_class_iou({s: row.get("iou") for s, row in sides.items()}, names)
    if "foreground_iou" not in report and any("fg_iou" in row for row in sides.values()):
        report["foreground_iou"] = {s: _finite(row.get("fg_iou")) for s, row in sides.items()}
    if "curves" not in report and folder is not None:
        report["curves"] = read_curves(folder)
    report.setdefault("environment", environment())
    return report


def per_class_iou(ious: dict[str, Sequence[float] | None], class_names: Sequence[str] = ()) -> list[dict]:
    """One row per class: {"class": index, "name": name (``class<k>`` when unknown), and one IoU per entry of
    ``ious`` (e.g. "before", "after"; None for a class absent from both target and prediction)}."""
    count = max((len(v) for v in ious.values() if v), default=0)
    return [{"class": k, "name": class_names[k] if k < len(class_names) else f"class{k}",
             **{side: _finite(v[k]) if v and k < len(v) else None for side, v in ious.items()}} for k in range(count)]


def read_curves(folder: str | Path) -> dict | None:
    """Loss (and validation mIoU, where the log has a `val_miou` column) per epoch from the training logs of a run
    folder (``CURVE_LOGS``): {stage: {"epoch": [...], "loss": [...], "val_miou": [...] or absent}}, or None."""
    curves = {}
    for stage, name in CURVE_LOGS:
        path = Path(folder) / name
        if not path.is_file():
            continue
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or "epoch" not in rows[0] or "loss" not in rows[0]:
            continue
        curves[stage] = {"epoch": [int(r["epoch"]) for r in rows], "loss": [float(r["loss"]) for r in rows]}
        if "val_miou" in rows[0]:
            curves[stage]["val_miou"] = [float(r["val_miou"]) if r["val_miou"] not in ("", None) else None
                                         for r in rows]
    return curves or None


def _finite(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _percent(value) -> str:
    return "n/a" if _finite(value) is None else f"{100 * value:.2f}"


def _class_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-class IoU table; with before and after, also the change in points."""
    if not rows:
        return [], []
    sides = [key for key in rows[0] if key not in ("class", "name")]
    header = ["class", *[f"IoU {side} (%)" if len(sides) > 1 else "IoU (%)" for side in sides]]
    paired = sides == ["before", "after"]
    header += ["change (points)"] if paired else []
    table_rows = []
    for row in rows:
        cells = [f"{row['class']} {row['name']}", *[_percent(row[side]) for side in sides]]
        if paired:
            both = _finite(row["before"]) is not None and _finite(row["after"]) is not None
            cells.append(f"{100 * (row['after'] - row['before']):+.2f}" if both else "n/a")
        table_rows.append(cells)
    return header, table_rows


def _accuracy_sections(report: dict, skipped: list[str]) -> list[str]:
    """Per-class IoU (with the foreground IoU of a binary task) and training curves, where the report has them."""
    out = []
    header, rows = _class_table(report.get("per_class_iou") or [])
    fg = report.get("foreground_iou")
    if isinstance(fg, dict):
        fg_line = [html.paragraph(f"Foreground IoU (class 1 of a binary task): {_percent(fg.get('before'))} % "
                                  f"before, {_percent(fg.get('after'))} % after.")]
    else:
        fg_line = [] if fg is None else [html.paragraph(f"Foreground IoU (class 1 of a binary task): "
                                                        f"{_percent(fg)} %.")]
    if rows or fg_line:
        out.append(html.section("Per-class IoU", *fg_line, *([html.table(header, rows)] if rows else [])))
    if report.get("curves"):
        out.append(html.section("Training curves", *_figures([("training curves",
                                                               lambda: plots.curves(report["curves"]))], skipped)))
    return out


def _environment_section(report: dict) -> list[str]:
    env = report.get("environment")
    if not env:
        return []
    return [html.section("Environment", html.table(["", "value"],
                                                   [(k, "unknown" if v is None else v) for k, v in env.items()]))]


def _plain_rows(values: dict) -> list[tuple[str, str]]:
    return [(key, f"{v:.4g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, list | dict) else v)
            for key, v in values.items()]


def _pareto_plots(points: list[dict], title: str, accuracy: str = "miou", ylabel: str = "mIoU (%)"
                  ) -> list[tuple[str, Callable[[], bytes]]]:
    kw = dict(title=title, accuracy=accuracy, ylabel=ylabel)
    return [("accuracy vs MACs", lambda: plots.pareto(points, cost="macs", xlabel="MACs (M)", unit=1e6, **kw)),
            ("accuracy vs measured latency", lambda: plots.pareto(points, cost="latency_ms",
                                                                  xlabel="latency (median, ms)", **kw))]


def _width_plots(widths: dict | None, run: str = "") -> list[tuple[str, Callable[[], bytes]]]:
    def draw():
        if not widths:
            raise ValueError("the report records no channel widths")
        return plots.widths(widths, **({"title": f"channel widths: {run}"} if run else {}))
    return [("channel widths before and after" + (f" ({run})" if run else ""), draw)]


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
