"""Demo benchmark: run `segprune demo` as a user would, in a fresh process, and record its figures and wall time.

    python benchmarks/demo.py        # writes benchmarks/results/demo.json

Goals (issue #2): <= 5 minutes on 2 CPU cores, mIoU drop <= 2 points, params and MACs each >= 2x smaller,
measured latency faster.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result  # noqa: E402


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "segprune.cli", "demo", "--out", str(out), "--quiet"], check=True)
        wall = time.perf_counter() - start
        report = json.loads((out / "report.json").read_text())
    before, after = report["before"], report["after"]
    goals = {"wall_seconds_le_300": wall <= 300, "miou_drop_le_2_points": 100 * (before["miou"] - after["miou"]) <= 2,
             "params_2x_smaller": after["params"] * 2 <= before["params"],
             "macs_2x_smaller": after["macs"] * 2 <= before["macs"],
             "latency_faster": after["latency_ms"] < before["latency_ms"]}
    write_result("demo", {"benchmark": "demo", "command": "segprune demo", "wall_seconds": wall, "machine": machine(),
                          "goals_met": goals, "miou_drop_points": 100 * (before["miou"] - after["miou"]),
                          "ratios": {k: after[k] / before[k] for k in ("params", "macs", "size_bytes", "latency_ms")},
                          "report": report})


if __name__ == "__main__":
    main()
