"""`python -m bench [PART ...] [--quick] [--out DIR]`: run benchmark parts, write DIR/results.json.

Each part is a module `bench.<part>` with `run(ctx: BenchContext) -> dict`: it measures, prints its
table, writes its plots beside the JSON via `ctx.path(...)`, and returns its JSON section.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from bench.common import BenchContext, machine_facts

# The order of a full run; `simulate` needs no running daemon, the others start their own.
PARTS = ("coldstart", "warm", "burst", "density", "isolation", "hostile", "simulate", "pages")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "parts",
        nargs="*",
        metavar="PART",
        help=f"parts to run (default: all of {', '.join(PARTS)})",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: few samples, small sizes")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="output dir (default: bench-results)",
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seed for everything random (default: 1)"
    )
    parser.add_argument("--trace", type=Path, help="simulate: an Azure 2019 style *_inv.csv file")
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        help="warm: also run the hourai rows of this checkout (before/after, same run)",
    )
    args = parser.parse_args(argv)

    parts = args.parts or list(PARTS)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part {', '.join(unknown)}; choose from {', '.join(PARTS)}")

    ctx = BenchContext(out=args.out, quick=args.quick, seed=args.seed, trace=args.trace)
    if args.baseline_tree:
        ctx.extra["baseline_tree"] = str(args.baseline_tree)
    results: dict[str, object] = {
        "machine": machine_facts(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "parts": {},
    }
    for part in parts:
        module = importlib.import_module(f"bench.{part}")
        print(f"\n## {part}\n", flush=True)
        results["parts"][part] = module.run(ctx)  # type: ignore[index]
    out = ctx.path("results.json")
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
