"""CAP ≥ slimming ≥ random, judged over seeds: mean and spread of camvid_methods.py runs that differ only in seed.

One seed cannot rank these methods at CPU budgets: the same configuration has moved by ~3 mIoU points from run to
run. So the comparison is repeated with ``--seed`` 1, 2, 3 ... (initialisation, data order and random pruning all
follow it) and summarised here: per MACs target and method, the mean and standard deviation of the test mIoU, the
per-seed values, and the goal judged on the means, with the mean paired difference (CAP − slimming, slimming −
random, over seeds) and its standard error, since the seeds share everything else.

    python benchmarks/camvid_methods.py --methods slimming cap random --seed 1 --out camvid_methods_seed1
    ...
    python benchmarks/camvid_seeds.py results/camvid_methods_seed1.json results/camvid_methods_seed2.json ...

Writes results/camvid_seeds.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_result  # noqa: E402

PAIRS = [("cap", "slimming"), ("cap[one_minus]", "slimming"), ("slimming", "random")]


VARIANT_KEYS = ("cap_weight", "cap_affinity")  # CAP variants are told apart by name, e.g. "cap[one_minus]"
DEFAULTS = {"cap_weight": "inverse", "cap_affinity": "dot"}


def load(paths: list[Path]) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in paths]
    budgets = {json.dumps({k: v for k, v in r["budget"].items() if k != "seed" and k not in VARIANT_KEYS},
                          sort_keys=True) for r in runs}
    if len(budgets) > 1:
        raise SystemExit(f"the runs differ in more than their seed: {sorted(budgets)}")
    return runs


def by_seed(runs: list[dict]) -> dict[tuple[float, str], dict[int, float]]:
    """(target, method) -> {seed: mIoU %}; the unpruned model as target 1.0."""
    out: dict[tuple[float, str], dict[int, float]] = {}
    for run in runs:
        for row in run["rows"]:
            if "miou" in row:
                out.setdefault((row.get("target_macs", 1.0), _name(row["method"], run["budget"])), {})[
                    run["budget"]["seed"]] = 100 * row["miou"]
    return out


def _name(method: str, budget: dict) -> str:
    """``cap`` with its non-default options in brackets: ``cap[one_minus]``."""
    if method != "cap":
        return method
    options = [str(budget[k]) for k in VARIANT_KEYS if budget.get(k, DEFAULTS[k]) != DEFAULTS[k]]
    return f"cap[{','.join(options)}]" if options else method


def stats(values: list[float]) -> dict:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return {"mean": statistics.mean(values), "sd": sd, "n": len(values)}


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    s = stats(diffs) if diffs else {"mean": float("nan"), "sd": float("nan"), "n": 0}
    s["se"] = s["sd"] / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    s["per_seed"] = dict(zip(seeds, diffs))
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--out", default="camvid_seeds")
    args = p.parse_args()
    runs = load(args.results)
    table = by_seed(runs)
    rows = [{"target_macs": t, "method": m, "per_seed": v, **stats(list(v.values()))}
            for (t, m), v in sorted(table.items(), key=lambda kv: (-kv[0][0], kv[0][1]))]
    goals = {}
    for t in sorted({t for t, _ in table if t < 1.0}, reverse=True):
        at = {m: v for (tt, m), v in table.items() if tt == t}
        goals[str(t)] = {f"{a} - {b}": paired(at[a], at[b]) for a, b in PAIRS if a in at and b in at}
        means = {m: statistics.mean(v.values()) for m, v in at.items()}
        for cap in sorted(m for m in means if m.startswith("cap") and {"slimming", "random"} <= set(means)):
            goals[str(t)][f"{cap} >= slimming >= random (means)"] = \
                means[cap] >= means["slimming"] >= means["random"]
    shared = {k: v for k, v in runs[0]["budget"].items() if k != "seed" and k not in VARIANT_KEYS}
    data = {"benchmark": "camvid_seeds", "budget": shared,
            "seeds": sorted(r["budget"]["seed"] for r in runs), "machine": runs[0]["machine"],
            "sources": [str(p) for p in args.results], "rows": rows, "goals": goals}
    write_result(args.out, data)
    (RESULTS / f"{args.out}.md").write_text(markdown(data))


def markdown(data: dict) -> str:
    lines = [f"# CAP vs slimming vs random over seeds {data['seeds']} ({data['budget']})", "",
             "| MACs left | method | mIoU % mean | sd | per seed |", "|---|---|---:|---:|---|"]
    for r in data["rows"]:
        per = ", ".join(f"{s}: {v:.2f}" for s, v in sorted(r["per_seed"].items(), key=lambda kv: int(kv[0])))
        lines.append(f"| {r['target_macs']} | {r['method']} | {r['mean']:.2f} | {r['sd']:.2f} | {per} |")
    lines += ["", "| MACs left | paired difference | mean | standard error | seeds |", "|---|---|---:|---:|---:|"]
    verdicts = []
    for t, g in data["goals"].items():
        for name, d in g.items():
            if isinstance(d, dict):
                lines.append(f"| {t} | {name} | {d['mean']:+.2f} | {d['se']:.2f} | {d['n']} |")
            else:
                verdicts.append(f"- {t} of the MACs, {name.replace('>=', '≥')}: {'met' if d else 'not met'}")
    return "\n".join([*lines, "", *verdicts, ""])


if __name__ == "__main__":
    main()
