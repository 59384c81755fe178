"""Reports: `report.json` (everything, machine-readable), `report.md` (the before/after table) and `report.html`
(self-contained: the table, per-class IoU, accuracy vs cost plots, training curves, channel widths, prediction
overlays and the environment the numbers were measured in).

Every report gains, where its data allows: `per_class_iou` (one row per class, with its name when known),
`foreground_iou` (binary tasks), `curves` (loss and validation mIoU per epoch, from the `train.csv` /
`finetune.csv` logs in the folder unless the report brings its own) and `environment` (see
:func:`segprune.report.environment.environment`). `write_model_report` reports one model (a trained checkpoint,
no before/after).

Report generation never fails a finished run: a plot that cannot be drawn (matplotlib missing, or any error)
becomes a note in all three files instead. `combined_report` builds one report from several run folders.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from segprune._utils import IGNORE_INDEX
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


def write_report(folder: str | Path, report: dict, *, samples: dict | Callable[[], dict | None] | None = None
                 ) -> list[str]:
    """Write report.json, report.md and report.html atomically into `folder`.

    Args:
        folder: The run folder.
        report: What `segprune.workflows.run` measured: `title`, `before`, `after` (rows of ROWS and `latency`;
            with `iou`, the per-class IoU list, and `fg_iou` for a binary task, they are tabulated), optionally
            `class_names`, `widths` ({layer: [before, after]}), `recipe`, `pruning`, `curves` (see
            :func:`read_curves`; by default read from the folder's training logs), `environment` (by default this
            process's) and `notes`.
        samples: Validation predictions for the overlays (see `_prediction_plots`), or a function returning them
            (called here, so that its failure too is only a note), or None.

    Returns:
        The notes on plots that were skipped (also added to the notes of all three files).
    """
    folder = Path(folder)
    report = enrich(report, folder)
    try:
        sections, skipped = _run_sections(report, samples)
    except Exception as err:  # noqa: BLE001 - see _attempt; report.json and report.md still carry the numbers
        skipped = [f"report.html incomplete: {type(err).__name__}: {err}"]
        sections = [html.section("Notes", html.notes(skipped, css="note"))]
    report = {**report, "notes": [*report.get("notes", []), *skipped]}
    page = _guarded_page(report["title"], sections, skipped)
    _write(folder / "report.json", json.dumps(report, indent=2) + "\n")
    _write(folder / "report.md", _markdown(report))
    _write(folder / "report.html", page)
    return skipped


def _markdown(report: dict) -> str:
    lat = report["after"]["latency"]
    return "\n".join([f"# segprune report: {report['title']}", "",
                      table(report["before"], report["after"], rows=rows_of(report)), "",
                      f"Latency: {_setup(lat)}, median of {lat.get('rounds', '?')} interleaved rounds.", "",
                      *_markdown_extras(report), *[f"- {note}" for note in report.get("notes", [])], ""])


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


# --- one run ---------------------------------------------------------------------------------------------------
def _run_sections(report: dict, samples: dict | None) -> tuple[list[str], list[str]]:
    skipped: list[str] = []
    before, after, lat = report["before"], report["after"], report["after"]["latency"]
    rows = [(label, fmt(before[key]), fmt(after[key]), f"{_ratio(before[key], after[key]):.3f}")
            for label, key, fmt in rows_of(report)]
    points = [{**report[side], "label": side, "run": report["title"]} for side in ("before", "after")]
    cost = _figures(_pareto_plots(points, report["title"], *accuracy_of(report)), skipped)
    width_figures = _figures(_width_plots(report.get("widths")), skipped)
    overlays = _figures(_prediction_plots(samples, skipped), skipped)
    sections = [
        html.section("Before and after", html.table(["", "before", "after", "after / before"], rows),
                     html.paragraph(f"Latency: {_setup(lat)}, median of {lat.get('rounds', '?')} interleaved rounds.")),
        *_accuracy_sections(report, skipped),
        html.section("Accuracy vs cost", *cost),
        html.section("Channel widths", *width_figures),
        html.section("Validation predictions", *overlays),
    ]
    if report.get("pruning"):
        sections.append(html.section("Pruning", html.table(["", "value"], _plain_rows(report["pruning"]))))
    sections.append(html.section("Notes", html.notes(report.get("notes", [])), html.notes(skipped, css="note")))
    if report.get("recipe"):
        sections.append(html.section("Recipe", html.table(["setting", "value"], _plain_rows(report["recipe"]))))
    sections += _environment_section(report)
    return sections, skipped


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


def _prediction_plots(samples, skipped: list[str]) -> list[tuple[str, Callable[[], bytes]]]:
    """One panel per validation image of `samples`: {"images" (N, 3, H, W), "targets", "before", "after"
    (N, H, W) labels, "num_classes", optional "ignore_index" and "class_names"}, or a function returning that."""
    if callable(samples):
        try:
            samples = samples()
        except Exception as err:  # noqa: BLE001 - see _attempt
            skipped.append(f"plot validation predictions skipped: {type(err).__name__}: {err}")
            return []
    if not samples:
        return []
    kw = dict(num_classes=samples["num_classes"], ignore_index=samples.get("ignore_index", IGNORE_INDEX),
              class_names=samples.get("class_names", ()))

    def panel(k):
        return lambda: plots.prediction_panel(samples["images"][k], samples["targets"][k], samples["before"][k],
                                              samples["after"][k], **kw)
    return [(f"validation image {k}: input | ground truth | unpruned | pruned", panel(k))
            for k in range(len(samples["images"]))]


# --- one model (a trained checkpoint) ---------------------------------------------------------------------------
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
    _write(folder / "report.json", json.dumps(report, indent=2) + "\n")
    _write(folder / "report.md", _model_markdown(report))
    _write(folder / "report.html", _guarded_page(title, sections, skipped))
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


# --- several runs ----------------------------------------------------------------------------------------------
def load_run(folder: str | Path) -> dict:
    """The report.json of a run folder, checked for what a combined report needs; clear errors otherwise."""
    path = Path(folder) / "report.json"
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: no such run folder")
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no report.json (is it a finished segprune run folder?)")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(report, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if report.get("kind") == "model":
        raise ValueError(f"{path}: reports one model (no before/after pruning); a combined report compares "
                         "compression runs (segprune run / demo)")
    for side in ("before", "after"):
        row = report.get(side)
        required = [accuracy_of(report)[0], *COST_KEYS]
        missing = [k for k in required if not isinstance(row, dict) or not isinstance(row.get(k), int | float)]
        if missing:
            raise ValueError(f"{path}: {side!r} lacks numeric {', '.join(missing)}")
    report.setdefault("title", Path(folder).name)
    return report


def columns(accuracy_label: str = "mIoU (%)") -> list[str]:
    """The combined table's columns, with the runs' accuracy (mIoU, or mask AP for instance runs)."""
    what, unit = accuracy_label.rsplit(" ", 1)
    return ["run", "model", "method", f"{what} before {unit}", f"{what} after {unit}", "params after",
            "params ratio", "MACs after (M)", "MACs ratio", "weights file after (KiB)", "latency after (ms)",
            "latency ratio", "latency setup"]



def _row(name: str, report: dict) -> list[str]:
    b, a, recipe = report["before"], report["after"], report.get("recipe", {})
    lat, key = a.get("latency"), accuracy_of(report)[0]
    return [name, str(recipe.get("model", "?")), str(recipe.get("method", "?")), f"{100 * b[key]:.2f}",
            f"{100 * a[key]:.2f}", f"{a['params']:,}", f"{_ratio(b['params'], a['params']):.3f}",
            f"{a['macs'] / 1e6:,.1f}", f"{_ratio(b['macs'], a['macs']):.3f}", f"{a['size_bytes'] / 1024:,.1f}",
            f"{a['latency_ms']:.2f}", f"{_ratio(b['latency_ms'], a['latency_ms']):.3f}",
            _setup(lat) if isinstance(lat, dict) and "device" in lat else "?"]


def _names(folders: Sequence[Path]) -> list[str]:
    """Run labels: folder names, made unique with their parent when two are equal."""
    names = [f.name or str(f) for f in folders]
    return [f"{f.parent.name}/{f.name}" if names.count(n) > 1 else n for f, n in zip(folders, names)]


def combined_report(folders: Sequence[str | Path], out: str | Path, *, force: bool = False,
                    reports: Sequence[dict] | None = None) -> dict:
    """One report (report.json, report.md, report.html in `out`) over several run folders: a table with one row
    per run and the accuracy vs MACs / latency plots across all of them. `reports`: the runs' reports when they
    were measured by the caller (one per folder), instead of each folder's report.json.

    Raises:
        FileNotFoundError / ValueError: a folder without a readable report.json (named).
        FileExistsError: `out` already holds a report and `force` is not set.
    """
    folders, out = [Path(f) for f in folders], Path(out)
    if not folders:
        raise ValueError("segprune report: give at least one run folder")
    reports = list(reports) if reports is not None else [load_run(f) for f in folders]
    kinds = {accuracy_of(r)[1] for r in reports}
    if len(kinds) > 1:
        by = ", ".join(f"{f} ({accuracy_of(r)[1].split(' (')[0]})" for f, r in zip(folders, reports))
        raise ValueError(f"segprune report: these runs are judged by different accuracies ({by}): one plot cannot "
                         "put mIoU and mask AP on one axis; report semantic and instance runs separately")
    if any(out.resolve() == f.resolve() for f in folders):
        raise ValueError(f"{out}: is one of the run folders; its own report would be replaced: choose another --out")
    existing = [name for name in FILES if (out / name).exists()]
    if existing and not force:
        raise FileExistsError(f"{out} already holds {', '.join(existing)}; choose another --out or pass --force")
    names = _names(folders)
    title = f"{len(reports)} runs" if len(reports) > 1 else reports[0]["title"]
    combined = {"title": title, "accuracy": accuracy_of(reports[0])[0],
                "runs": [{"folder": str(f), "name": n, "report": r} for f, n, r in zip(folders, names, reports)],
                "notes": []}
    sections, skipped = _combined_sections(combined)
    combined["notes"] = skipped
    page = _guarded_page(title, sections, skipped)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "report.json", json.dumps(combined, indent=2) + "\n")
    _write(out / "report.md", _combined_markdown(combined))
    _write(out / "report.html", page)
    return combined


def _combined_sections(combined: dict) -> tuple[list[str], list[str]]:
    skipped: list[str] = []
    runs = combined["runs"]
    points = [{**run["report"][side], "label": side, "run": run["name"]}
              for run in runs for side in ("before", "after")]
    key, label = accuracy_of(runs[0]["report"])
    cost = _figures(_pareto_plots(points, combined["title"], key, label), skipped)
    sections = [
        html.section("Runs", html.table(columns(label), [_row(run["name"], run["report"]) for run in runs]),
                     html.paragraph("Ratios are after / before within each run. Latencies of different runs are "
                                    "comparable only when measured on the same machine with the same setup.")),
        html.section("Accuracy vs cost (all runs)", *cost),
        html.section("Channel widths", *[figure for run in runs for figure in
                                         _figures(_width_plots(run["report"].get("widths"), run["name"]), skipped)]),
        html.section("Run folders", html.table(["run", "folder", "title"],
                                               [(r["name"], r["folder"], r["report"]["title"]) for r in runs])),
    ]
    if skipped:
        sections.append(html.section("Notes", html.notes(skipped, css="note")))
    return sections, skipped


def _combined_markdown(combined: dict) -> str:
    cols = columns(accuracy_of(combined["runs"][0]["report"])[1])
    lines = [f"# segprune report: {combined['title']}", "", "| " + " | ".join(cols) + " |",
             "|---|---|---|" + "---:|" * (len(cols) - 4) + "---|"]
    lines += ["| " + " | ".join(_row(run["name"], run["report"])) + " |" for run in combined["runs"]]
    return "\n".join([*lines, "", *[f"- {note}" for note in combined["notes"]], ""])


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)

