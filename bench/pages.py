"""What a forked worker costs in private memory, and what immortal objects save (3.12+).

A worker shares every page with its snapshot until it writes one; its USS (memory no other
process maps) is what it really adds. For the Flask example (Flask preloaded in the root
zygote, as a Flask host would), on every interpreter given: the snapshot's USS, and a fresh
worker's USS after its first request and after 50 more, with the zygotes' objects left
mortal and made immortal (hourai.snapshot.immortal; 3.12 and 3.13 only). The difference is
the pages a worker copies only because reading an object writes its refcount.

Interpreters: this one, plus those named in ``HOURAI_PYTHONS`` (``:``-separated), each with
hourai and Flask installed, e.g.
``HOURAI_PYTHONS=/path/to/venv312/bin/python python -m bench pages``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import psutil

from bench.coldstart import REPO, BenchServer
from bench.common import BenchContext, table

FLASK = REPO / "examples" / "flask_app" / "app.py"


def _interpreters() -> list[str]:
    extra = [p for p in os.environ.get("HOURAI_PYTHONS", "").split(":") if p]
    return [sys.executable, *extra]


def _version(python: str) -> tuple[int, int]:
    out = subprocess.run(
        [python, "-c", "import sys; print(*sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[0]), int(out[1])


def _uss(pid: int) -> int:
    return psutil.Process(pid).memory_full_info().uss


def _tree(server: BenchServer) -> tuple[int, list[int]]:
    """(snapshot pid, worker pids) below the bench server."""
    root = psutil.Process(server.proc.pid)
    for zygote in root.children():
        for snapshot in zygote.children():
            return snapshot.pid, [w.pid for w in snapshot.children()]
    raise RuntimeError("no snapshot below the bench server")


def measure(python: str, mortal: bool, workers: int) -> dict[str, object]:
    args = ["--spares", "0", "--max-workers", "1", "--preload", "flask"]
    server = BenchServer(FLASK, *args, *(["--mortal"] if mortal else []), python=python)
    try:
        first, later, snapshot_uss = [], [], []
        for _ in range(workers):
            server.sample("/", None)  # forks a fresh worker
            snapshot, pids = _tree(server)
            (worker,) = pids
            first.append(_uss(worker))
            for _ in range(50):
                server.sample("/", "warm")
            later.append(_uss(worker))
            snapshot_uss.append(_uss(snapshot))
            server.client.get("/__bench/evict")  # the next round forks a new one
            try:
                psutil.Process(worker).wait(10)
            except psutil.NoSuchProcess:
                pass
        return {
            "snapshot_uss_kib": statistics.median(snapshot_uss) / 1024,
            "worker_first_kib": statistics.median(first) / 1024,
            "worker_after_50_kib": statistics.median(later) / 1024,
        }
    finally:
        server.stop()


def run(ctx: BenchContext) -> dict:
    workers = 2 if ctx.quick else 7
    results: dict[str, dict[str, object]] = {}
    for python in _interpreters():
        major, minor = _version(python)
        modes = [True, False] if (3, 12) <= (major, minor) <= (3, 13) else [True]
        for mortal in modes:
            key = f"{major}.{minor}" + (" mortal" if mortal else " immortal")
            results[key] = measure(python, mortal, workers)
    rows = [
        [
            key,
            f"{r['snapshot_uss_kib']:.0f}",
            f"{r['worker_first_kib']:.0f}",
            f"{r['worker_after_50_kib']:.0f}",
        ]
        for key, r in results.items()
    ]
    print(
        table(["python", "snapshot USS KiB", "worker USS, 1st req", "after 50 more"], rows),
        file=sys.stderr,
    )
    out = {"workers_per_mode": workers, "flask": results}
    ctx.path("pages.json").write_text(json.dumps(out, indent=1))
    return out
