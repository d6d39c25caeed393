"""Medians of several `python -m bench warm` runs: `python -m bench.median DIR [DIR ...]`.

One run on this shared 2-core machine is noise; the figures quoted in the README are the
medians over runs of each ratio (every ratio taken within its own run, side by side), with
the spread. Prints a Markdown table per server and the goals; ``--json FILE`` writes them.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench.common import table
from bench.warm import ADDED_LABEL, ADDED_LATENCY_GOAL_MS, THROUGHPUT_GOALS


def medians(dirs: list[Path]) -> dict:
    runs = [json.loads((d / "results.json").read_text())["parts"]["warm"] for d in dirs]
    servers = {}
    for key in runs[0]["servers"]:
        cols = {
            col: [r["servers"][key][col] for r in runs]
            for col in ("rps", "p50_ms", "p99_ms", "ratio_to_baseline", "ratio_to_raw")
        }
        servers[key] = {col: statistics.median(v) for col, v in cols.items()}
        servers[key]["ratio_to_baseline_runs"] = cols["ratio_to_baseline"]
    goals = {}
    for label, first in runs[0]["goals"].items():
        values = [r["goals"][label]["measured"] for r in runs]
        median = statistics.median(values)
        latency = "latency" in label
        met = median <= first["goal"] if latency else median >= first["goal"]
        goals[label] = {"median": median, "runs": values, "goal": first["goal"], "met": met}
    latency = {
        key: statistics.median(r["latency"][key] for r in runs)
        for key in ("raw_p50_ms", "warm_p50_ms", "added_p50_ms", "base_p50_ms", "base_added_p50_ms")
        if key in runs[0]["latency"]
    }
    # The same goals for the baseline tree's rows (before/after in the same runs).
    for label, key, base, least in THROUGHPUT_GOALS:
        other = key.replace("hourai-", "base-")
        if other in runs[0]["servers"]:
            values = [r["servers"][other]["rps"] / r["servers"][base]["rps"] for r in runs]
            median = statistics.median(values)
            goals[f"(baseline tree) {label}"] = {
                "median": median,
                "runs": values,
                "goal": least,
                "met": median >= least,
            }
    if "base_added_p50_ms" in latency:
        values = [r["latency"]["base_added_p50_ms"] for r in runs]
        goals[f"(baseline tree) {ADDED_LABEL}"] = {
            "median": statistics.median(values),
            "runs": values,
            "goal": ADDED_LATENCY_GOAL_MS,
            "met": statistics.median(values) <= ADDED_LATENCY_GOAL_MS,
        }
    return {"runs": len(runs), "servers": servers, "goals": goals, "latency": latency}


def _figure(label: str, value: float) -> str:
    return f"{value * 1000:.0f} µs" if "latency" in label else f"{value:.2f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.median", description=__doc__)
    parser.add_argument("dirs", nargs="+", type=Path, help="--out dirs of bench warm runs")
    parser.add_argument("--json", type=Path, help="also write the medians here")
    args = parser.parse_args(argv)
    doc = medians(args.dirs)
    rows = [
        [
            key,
            s["rps"],
            s["p50_ms"],
            s["ratio_to_baseline"],
            " ".join(f"{x:.2f}" for x in s["ratio_to_baseline_runs"]),
            s["ratio_to_raw"],
        ]
        for key, s in doc["servers"].items()
    ]
    print(f"medians of {doc['runs']} runs")
    headers = ["server/app", "req/s", "p50 ms", "x uvicorn/gunicorn", "(runs)", "x raw"]
    print(table(headers, rows))
    print()
    goal_rows = [
        [
            label,
            _figure(label, g["median"]),
            " ".join(_figure(label, v) for v in g["runs"]),
            "met" if g["met"] else "NOT met",
        ]
        for label, g in doc["goals"].items()
    ]
    print(table(["goal", "median", "runs", ""], goal_rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
