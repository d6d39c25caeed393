"""The warm path of two source trees, interleaved: `python -m bench.ab BASE_TREE [ROUNDS]`.

Each round starts ``bench.server`` from each tree in turn (order alternating) on the plain
ASGI and WSGI examples, one worker, and measures with the same load generator: the median
latency over one connection, and throughput over 16. A change on the request path is
compared to its branch point on the same machine in the same minutes, which is the only
comparison a shared machine allows.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.loadgen import run_load

HERE = Path(__file__).resolve().parents[1]
APPS = {"asgi": "examples/asgi_plain/app.py", "wsgi": "examples/wsgi_plain/app.py"}


def _measure(tree: Path, app: str) -> tuple[float, float]:
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "bench.server", str(tree / app)),
            *("--spares", "0", "--max-workers", "1"),
        ],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"bench server from {tree} did not start: {line!r}")
        port = int(line.split()[1])
        run_load(port, 1, 0.5)  # warm-up
        one = run_load(port, 1, 3.0)
        many = run_load(port, 16, 3.0)
        return one["p50_ms"], many["rps"]
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    trees = {"base": Path(sys.argv[1]).resolve(), "this": HERE}
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in range(rounds):
        order = list(trees.items()) if r % 2 == 0 else list(reversed(trees.items()))
        for app in APPS:
            for name, tree in order:
                results.setdefault((app, name), []).append(_measure(tree, app))
    for (app, name), rows in sorted(results.items()):
        p50s = [p for p, _ in rows]
        print(
            f"{app} {name:5s} 1-conn p50 {statistics.median(p50s):.3f} ms "
            f"(rounds {min(p50s):.3f}..{max(p50s):.3f}); "
            f"16-conn {statistics.median(r for _, r in rows):.0f} req/s"
        )


if __name__ == "__main__":
    main()
