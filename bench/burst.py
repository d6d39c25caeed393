"""Burst: N concurrent requests to a function with no worker yet.

Measures the time until all are answered, forks per second while the pool grows to its
ceiling, and the latency of those first requests (each on its own connection, all sent at
once). Every request must be answered 200.
"""

from __future__ import annotations

import json
import threading
import time

from bench.coldstart import HELLO, BenchServer
from bench.common import BenchContext, summarize, table
from bench.httpclient import Client

MAX_WORKERS = 16


def one_burst(n: int) -> dict:
    server = BenchServer(HELLO, "--spares", "0", "--max-workers", str(MAX_WORKERS))
    try:
        clients = [Client(server.port) for _ in range(n)]
        for c in clients:
            c._connect()  # connections open first: the burst is the requests, not the handshakes
        latencies: list[float] = []
        statuses: list[int] = []
        starts: list[str] = []
        lock = threading.Lock()
        go = threading.Event()

        def fire(c: Client) -> None:
            go.wait()
            status, headers, _body, ms = c.get("/")
            with lock:
                latencies.append(ms)
                statuses.append(status)
                starts.append(headers.get("x-hourai-start", "?"))

        threads = [threading.Thread(target=fire, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        t0 = time.perf_counter()
        go.set()
        for t in threads:
            t.join(120)
        total_s = time.perf_counter() - t0
        for c in clients:
            c.close()
    finally:
        server.stop()
    forks = sum(1 for s in starts if s == "fork")
    return {
        "requests": n,
        "answered_200": statuses.count(200),
        "all_answered": statuses.count(200) == n,
        "time_to_all_ms": total_s * 1000,
        "workers_forked": forks,
        "forks_per_s": forks / total_s if total_s else 0.0,
        "latency": summarize(latencies),
        "starts": {s: starts.count(s) for s in set(starts)},
    }


def run(ctx: BenchContext) -> dict:
    n = 30 if ctx.quick else 200
    reps = 1 if ctx.quick else 3
    runs = [one_burst(n) for _ in range(reps)]
    rows = [
        [
            i + 1,
            r["requests"],
            r["answered_200"],
            r["time_to_all_ms"],
            r["workers_forked"],
            r["forks_per_s"],
            r["latency"]["p50_ms"],
            r["latency"]["p99_ms"],
        ]
        for i, r in enumerate(runs)
    ]
    print(
        table(
            [
                "run",
                "requests",
                "answered 200",
                "all answered ms",
                "forks",
                "forks/s",
                "p50 ms",
                "p99 ms",
            ],
            rows,
        )
    )
    result = {"max_workers": MAX_WORKERS, "runs": runs}
    ctx.path("burst.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
