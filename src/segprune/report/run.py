"""A compression run's report (`segprune run` / `demo`): `report.json` (everything, machine-readable),
`report.md` (the before/after table) and `report.html` (self-contained: the table, per-class IoU, accuracy vs cost
plots, training curves, channel widths, prediction overlays and the environment the numbers were measured in).

Why a module of its own: it is the one report with validation prediction overlays and a before/after of every row;
what it shares with the other two kinds is in :mod:`segprune.report.common`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from segprune._utils import IGNORE_INDEX
from segprune.report import html, plots
from segprune.report.common import (
    _accuracy_sections,
    _environment_section,
    _figures,
    _guarded_page,
    _markdown_extras,
    _pareto_plots,
    _plain_rows,
    _ratio,
    _setup,
    _width_plots,
    accuracy_of,
    enrich,
    rows_of,
    table,
    write_atomic,
)


def write_report(folder: str | Path, report: dict, *, samples: dict | Callable[[], dict | None] | None = None
                 ) -> list[str]:
    """Write report.json, report.md and report.html atomically into `folder`.

    Args:
        folder: The run folder.
        report: What `segprune.workflows.run` measured: `title`, `before`, `after` (rows of ROWS and `latency`;
            with `iou`, the per-class IoU list, and `fg_iou` for a binary task, they are tabulated), optionally
            `class_names`, `widths` ({layer: [before, after]}), `recipe`, `pruning`, `curves` (see
            :func:`~segprune.report.common.read_curves`; by default read from the folder's training logs),
            `environment` (by default this process's) and `notes`.
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
    write_atomic(folder / "report.json", json.dumps(report, indent=2) + "\n")
    write_atomic(folder / "report.md", _markdown(report))
    write_atomic(folder / "report.html", page)
    return skipped


def _markdown(report: dict) -> str:
    lat = report["after"]["latency"]
    return "\n".join([f"# segprune report: {report['title']}", "",
                      table(report["before"], report["after"], rows=rows_of(report)), "",
                      f"Latency: {_setup(lat)}, median of {lat.get('rounds', '?')} interleaved rounds.", "",
                      *_markdown_extras(report), *[f"- {note}" for note in report.get("notes", [])], ""])


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
