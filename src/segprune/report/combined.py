"""One report over several run folders (`segprune report RUN_DIR...`, and the step-by-step checkpoints of
`segprune report`, each against the first): a table with one row per run and the accuracy vs MACs / latency plots
across all of them.

Why a module of its own: it reads and checks other runs' report.json (``load_run``) and refuses what cannot share
one table or plot; what it shares with the other kinds is in :mod:`segprune.report.common`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from segprune.report import html
from segprune.report.common import (
    COST_KEYS,
    _figures,
    _guarded_page,
    _pareto_plots,
    _ratio,
    _setup,
    _width_plots,
    accuracy_of,
    write_atomic,
)


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


def combined_report(folders: Sequence[str | Path], out: str | Path, *, reports: Sequence[dict] | None = None) -> dict:
    """One report (report.json, report.md, report.html in `out`) over several run folders: a table with one row
    per run and the accuracy vs MACs / latency plots across all of them. `reports`: the runs' reports when they
    were measured by the caller (one per folder), instead of each folder's report.json. A report already in `out`
    is replaced: commands claim `out` first (:func:`segprune.workflows.rundir.claim`).

    Raises:
        FileNotFoundError / ValueError: a folder without a readable report.json (named).
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
    names = _names(folders)
    title = f"{len(reports)} runs" if len(reports) > 1 else reports[0]["title"]
    combined = {"title": title, "accuracy": accuracy_of(reports[0])[0],
                "runs": [{"folder": str(f), "name": n, "report": r} for f, n, r in zip(folders, names, reports)],
                "notes": []}
    sections, skipped = _combined_sections(combined)
    combined["notes"] = skipped
    page = _guarded_page(title, sections, skipped)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "report.json", json.dumps(combined, indent=2) + "\n")
    write_atomic(out / "report.md", _combined_markdown(combined))
    write_atomic(out / "report.html", page)
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
