"""Reports: `report.json` (everything, machine-readable), `report.md` (the before/after table) and `report.html`
(self-contained: the table, accuracy vs cost plots, channel widths and prediction overlays).

Report generation never fails a finished run: a plot that cannot be drawn (matplotlib missing, or any error)
becomes a note in all three files instead. `combined_report` builds one report from several run folders.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from segprune.report import html, plots

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
NO_MATPLOTLIB = "matplotlib not installed (pip install segprune[report])"
FILES = ("report.json", "report.md", "report.html")


def accuracy_of(report: dict) -> tuple[str, str]:
    """The accuracy a report is judged by, as (key, label): mask AP for an instance run, else mIoU."""
    return ("mask_ap", "mask AP (%)") if report.get("task") == "instance" else ("miou", "mIoU (%)")


def _ratio(before: float, after: float) -> float:
    return after / before if before else float("nan")


def rows_of(report: dict) -> list:
    """The table rows of a report: INSTANCE_ROWS for ``"task": "instance"``, else ROWS (mIoU)."""
    return INSTANCE_ROWS if report.get("task") == "instance" else ROWS


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
        report: What `segprune.workflows.run` measured: `title`, `before`, `after` (rows of ROWS and `latency`),
            optionally `widths` ({layer: [before, after]}), `recipe`, `pruning` and `notes`.
        samples: Validation predictions for the overlays (see `_prediction_plots`), or a function returning them
            (called here, so that its failure too is only a note), or None.

    Returns:
        The notes on plots that were skipped (also added to the notes of all three files).
    """
    folder = Path(folder)
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
                      *[f"- {note}" for note in report.get("notes", [])], ""])


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
        html.section("Accuracy vs cost", *cost),
        html.section("Channel widths", *width_figures),
        html.section("Validation predictions", *overlays),
    ]
    if report.get("pruning"):
        sections.append(html.section("Pruning", html.table(["", "value"], _plain_rows(report["pruning"]))))
    sections.append(html.section("Notes", html.notes(report.get("notes", [])), html.notes(skipped, css="note")))
    if report.get("recipe"):
        sections.append(html.section("Recipe", html.table(["setting", "value"], _plain_rows(report["recipe"]))))
    return sections, skipped


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
    kw = dict(num_classes=samples["num_classes"], ignore_index=samples.get("ignore_index", 255),
              class_names=samples.get("class_names", ()))

    def panel(k):
        return lambda: plots.prediction_panel(samples["images"][k], samples["targets"][k], samples["before"][k],
                                              samples["after"][k], **kw)
    return [(f"validation image {k}: input | ground truth | unpruned | pruned", panel(k))
            for k in range(len(samples["images"]))]


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


def combined_report(folders: Sequence[str | Path], out: str | Path, *, force: bool = False) -> dict:
    """One report (report.json, report.md, report.html in `out`) over several run folders: a table with one row
    per run and the accuracy vs MACs / latency plots across all of them.

    Raises:
        FileNotFoundError / ValueError: a folder without a readable report.json (named).
        FileExistsError: `out` already holds a report and `force` is not set.
    """
    folders, out = [Path(f) for f in folders], Path(out)
    if not folders:
        raise ValueError("segprune report: give at least one run folder")
    reports = [load_run(f) for f in folders]
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

