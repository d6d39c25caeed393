"""A hostile neighbour on the channel: tenant B's latency and the daemon's cost while tenant A's
function writes its own frames on its worker channel.

One hourai serves two tenants: A runs tests/functions/hostile_worker.py, B the hello handler. Rows:
B alone; B while A floods its channel with well-formed answers nobody asked for; B while A
floods it with junk. For each flood, the daemon's own CPU time over the window (the daemon
runs outside every tenant's cgroup, so a tenant's `--cpu` cannot bound it). Last, the
daemon's peak RSS while six requests to A's other function each return a 60 MB body at once.

`python -m bench hostile` (about a minute).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from bench.coldstart import HELLO, BenchServer
from bench.common import BenchContext, summarize, table
from bench.httpclient import Client

HOSTILE = Path(__file__).resolve().parents[1] / "tests" / "functions" / "hostile_worker.py"


def _samples(port: int, n: int) -> list[float]:
    b = Client(port)
    out = []
    for _ in range(n):
        out.append(b.get("/b/")[3])
        time.sleep(0.01)
    b.close()
    return out


def _flood(srv: BenchServer, kind: str, n: int) -> tuple[list[float], float, float, list[int]]:
    """B's samples, the daemon's CPU seconds and the wall seconds, A's statuses."""
    daemon = psutil.Process(srv.proc.pid)
    stop = threading.Event()
    statuses: list[int] = []

    def attack() -> None:
        c = Client(srv.port)
        while not stop.is_set():
            statuses.append(c.get(f"/a/{kind}?s=2")[0])
            if statuses[-1] != 200:
                # Refused (killed, or backing off): try again soon, as a persistent attacker
                # would, without turning the row into a measure of 503s answered per second.
                time.sleep(0.05)
        c.close()

    attacker = threading.Thread(target=attack)
    cpu0 = sum(daemon.cpu_times()[:2])
    t0 = time.monotonic()
    attacker.start()
    try:
        time.sleep(0.5)
        samples = _samples(srv.port, n)
    finally:
        stop.set()
        attacker.join(60)
    wall = time.monotonic() - t0
    cpu = sum(daemon.cpu_times()[:2]) - cpu0
    return samples, cpu, wall, statuses


def _big_responses(srv: BenchServer, count: int) -> tuple[int, int, list[int]]:
    """(daemon RSS before, peak RSS during, statuses) for `count` concurrent 60 MB answers;
    status -1: the connection broke mid-answer."""
    daemon = psutil.Process(srv.proc.pid)
    before = daemon.memory_info().rss
    peak = before
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, daemon.memory_info().rss)
            time.sleep(0.005)

    def one(_: int) -> int:
        try:
            return Client(srv.port, timeout=30).get("/c/big?mb=60")[0]
        except OSError:
            return -1  # the connection broke mid-answer

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(count) as pool:
            replies = list(pool.map(one, range(count)))
    finally:
        done.set()
        watcher.join(10)
    return before, peak, replies


def run(ctx: BenchContext) -> dict:
    n = 30 if ctx.quick else 300
    srv = BenchServer(
        HELLO,
        "--spares",
        "0",
        "--max-workers",
        "6",
        "--timeout",
        "20",
        "--also",
        f"a,{HOSTILE},tenant-a,",
        "--also",
        f"b,{HELLO},tenant-b,",
        # its own function for the big answers, so a flood's crash-loop backoff is not in the way
        "--also",
        f"c,{HOSTILE},tenant-a,",
    )
    result: dict[str, object] = {}
    rows = []
    try:
        for _ in range(20):
            Client(srv.port).get("/b/")
        daemon = psutil.Process(srv.proc.pid)
        cpu0, t0 = sum(daemon.cpu_times()[:2]), time.monotonic()
        alone = summarize(_samples(srv.port, n))
        cpu, wall = sum(daemon.cpu_times()[:2]) - cpu0, time.monotonic() - t0
        rows.append(
            [
                "B alone",
                f"{alone['p50_ms']:.2f}",
                f"{alone['p99_ms']:.2f}",
                f"{cpu:.2f} s in {wall:.1f} s",
                "-",
            ]
        )
        result["alone"] = {**alone, "daemon_cpu_s": cpu, "wall_s": wall}
        for kind in ("flood-valid", "flood-junk"):
            samples, cpu, wall, statuses = _flood(srv, kind, n)
            s = summarize(samples)
            result[kind] = {
                **s,
                "daemon_cpu_s": cpu,
                "wall_s": wall,
                "attacker_statuses": sorted(set(statuses)),
                "attacker_requests": len(statuses),
            }
            rows.append(
                [
                    f"B while A {kind}s",
                    f"{s['p50_ms']:.2f}",
                    f"{s['p99_ms']:.2f}",
                    f"{cpu:.2f} s in {wall:.1f} s",
                    ",".join(map(str, sorted(set(statuses)))),
                ]
            )
        before, peak, statuses = _big_responses(srv, 6)
        result["six_60mb_responses"] = {
            "rss_before_mib": before / 2**20,
            "rss_peak_mib": peak / 2**20,
            "statuses": statuses,
        }
    finally:
        srv.stop()
    print(table(["case", "B p50 ms", "B p99 ms", "daemon CPU", "A got"], rows))
    big = result["six_60mb_responses"]
    assert isinstance(big, dict)
    print(
        f"six concurrent 60 MB answers from A: daemon RSS {big['rss_before_mib']:.0f} MiB -> "
        f"peak {big['rss_peak_mib']:.0f} MiB; A got {big['statuses']}"
    )
    return result
