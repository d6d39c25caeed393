"""Isolation under load: tenant B's latency while tenant A burns CPU.

One hourai serves two tenants: A's function spins the CPU for as long as it is
asked, B's is the hello handler. B's warm latency is measured three ways in one run: alone,
while A keeps both cores busy with no limit, and while A is held to `--cpu 0.5` (its cgroup's
CPU quota). Needs root for the quota; without it that row says why it is missing.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from bench.coldstart import HELLO, BenchServer
from bench.common import BenchContext, summarize, table
from bench.httpclient import Client

SPIN = Path(__file__).resolve().parent / "functions" / "spin.py"


def measure(cpu_limit: float | None, load: bool, n: int) -> list[float]:
    # A separate daemon process (bench.server), so the load generator's threads never share
    # an interpreter lock with the runtime they measure.
    srv = BenchServer(
        HELLO,
        "--spares",
        "0",
        "--max-workers",
        "4",
        "--timeout",
        "60",
        "--also",
        f"a,{SPIN},tenant-a,{cpu_limit or ''}",
        "--also",
        f"b,{HELLO},tenant-b,",
    )
    burners: list[threading.Thread] = []
    stop = threading.Event()
    try:
        b = Client(srv.port)
        for _ in range(20):
            b.get("/b/")  # warm B up
        if load:

            def burn() -> None:
                c = Client(srv.port)
                while not stop.is_set():
                    c.get("/a/?s=0.5")
                c.close()

            burners = [threading.Thread(target=burn) for _ in range(2)]  # both cores
            for t in burners:
                t.start()
            time.sleep(1.0)  # A's workers are up and spinning
        samples = []
        for _ in range(n):
            samples.append(b.get("/b/")[3])
            time.sleep(0.01)
        b.close()
        return samples
    finally:
        stop.set()
        for t in burners:
            t.join(30)
        srv.stop()


def run(ctx: BenchContext) -> dict:
    n = 30 if ctx.quick else 300
    rows = []
    result: dict[str, object] = {}
    cases = [("B alone", None, False), ("B while A burns CPU, no limit", None, True)]
    if os.geteuid() == 0:
        cases.append(("B while A burns CPU, A held to 0.5 cpu", 0.5, True))
    else:
        result["quota_skipped"] = "needs root: cgroup CPU quotas are set by a root daemon"
    for label, cpu, load in cases:
        stats = summarize(measure(cpu, load, n))
        result[label] = stats
        rows.append([label, stats["n"], stats["p50_ms"], stats["p99_ms"]])
    print(table(["case", "n", "B p50 ms", "B p99 ms"], rows))
    ctx.path("isolation.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
