"""Reports: `report.json` (everything, machine-readable) and `report.md` (the before/after table)."""

from __future__ import annotations

import json
from pathlib import Path

ROWS = [("mIoU (%)", "miou", lambda v: f"{100 * v:.2f}"),
        ("params", "params", lambda v: f"{v:,}"),
        ("MACs", "macs", lambda v: f"{v / 1e6:,.1f} M"),
        ("weights file", "size_bytes", lambda v: f"{v / 1024:,.1f} KiB"),
        ("latency (median)", "latency_ms", lambda v: f"{v:.2f} ms")]


def table(before: dict, after: dict) -> str:
    """A Markdown before/after table with the after/before ratio of every row."""
    lines = ["| | before | after | after / before |", "|---|---:|---:|---:|"]
    for label, key, fmt in ROWS:
        ratio = after[key] / before[key] if before[key] else float("nan")
        lines.append(f"| {label} | {fmt(before[key])} | {fmt(after[key])} | {ratio:.3f} |")
    return "\n".join(lines)


def write_report(folder: str | Path, report: dict) -> None:
    """Write report.json and report.md atomically into `folder`."""
    folder = Path(folder)
    _write(folder / "report.json", json.dumps(report, indent=2) + "\n")
    lat = report["after"]["latency"]
    md = [f"# segprune report: {report['title']}", "", table(report["before"], report["after"]), "",
          f"Latency: {lat['device']}, {lat['dtype']}, batch {lat['batch']}, input {lat['input_size']}, "
          f"{lat['threads']} threads, median of {lat['rounds']} interleaved rounds.", "",
          *[f"- {note}" for note in report.get("notes", [])], ""]
    _write(folder / "report.md", "\n".join(md))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
