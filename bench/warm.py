"""Warm path: throughput and latency of hourai against uvicorn and gunicorn, same app.

The same ASGI app (examples/asgi_plain) under hourai and under uvicorn (one process, uvloop,
httptools); the same WSGI app (examples/wsgi_plain) under hourai and under gunicorn (one
sync worker); and, as the floor under all of them, a bare uvloop + httptools server that
answers by itself (bench/rawserver.py). One load generator for all, same connections, same
duration, back to back in one run: `wrk` when it is installed, else the built-in one in
bench/loadgen.py (the JSON says which). hourai runs with one process-mode worker
(hourai-1w: one process serving the function, like uvicorn and gunicorn here, plus the
daemon), with two (hourai-2w: one per core), and with one thread-mode worker running up to
16 invocations at once (hourai-c16); every request crosses its extra process hop,
daemon → worker → daemon.

Added latency: one connection, one request at a time, to the raw server and to a warm
hourai worker of examples/hello (process mode), in interleaved rounds so that the machine's
noise falls on both alike; the difference of the medians is what hourai adds.

Each figure is printed against its goal (issue 14), as a ratio to its baseline in the same
run; the machine is shared and noisy, so compare runs by these ratios, not by req/s.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time

from bench.coldstart import HELLO, REPO, BenchServer
from bench.common import BenchContext, percentile, table
from bench.httpclient import Client
from bench.loadgen import run_load

ASGI = REPO / "examples" / "asgi_plain" / "app.py"
WSGI = REPO / "examples" / "wsgi_plain" / "app.py"
CONNECTIONS = 16

# Issue 14's goals: (label, server/app, baseline, least ratio to it).
THROUGHPUT_GOALS = [
    ("ASGI, thread mode (concurrency 16) >= 1.0x uvicorn", "hourai-c16/asgi", "uvicorn/asgi", 1.0),
    ("ASGI, process mode, 1 worker >= 0.5x uvicorn", "hourai-1w/asgi", "uvicorn/asgi", 0.5),
    ("WSGI, 1 worker >= 2x gunicorn (1 sync worker)", "hourai-1w/wsgi", "gunicorn/wsgi", 2.0),
]
ADDED_LATENCY_GOAL_MS = 0.100  # warm p50 over the raw uvloop + httptools server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class External:
    """uvicorn or gunicorn as a child process; stopped by pid."""

    def __init__(self, argv: list[str], port: int) -> None:
        self.port = port
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{argv[2]} exited with {self.proc.returncode}") from None
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{argv[2]} did not listen on {port}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wrk(port: int, seconds: float) -> dict:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{CONNECTIONS}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m, out
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": ms("50"),
        "p99_ms": ms("99"),
        "errors": int(errors.group(1)) if errors else 0,
    }


def load(port: int, seconds: float, generator: str) -> dict:
    if generator == "wrk":
        return wrk(port, seconds)
    return run_load(port, CONNECTIONS, seconds)


def run(ctx: BenchContext) -> dict:
    seconds = 1.0 if ctx.quick else 10.0
    generator = "wrk" if shutil.which("wrk") else "builtin"
    servers = [
        ("raw", "asgi", lambda: _raw()),
        ("hourai-1w", "asgi", lambda: BenchServer(ASGI, "--spares", "0", "--max-workers", "1")),
        ("hourai-2w", "asgi", lambda: BenchServer(ASGI, "--spares", "1", "--max-workers", "2")),
        (
            "hourai-c16",
            "asgi",
            lambda: BenchServer(ASGI, "--spares", "0", "--max-workers", "1", "--concurrency", "16"),
        ),
        ("uvicorn", "asgi", lambda: _uvicorn()),
        ("hourai-1w", "wsgi", lambda: BenchServer(WSGI, "--spares", "0", "--max-workers", "1")),
        ("hourai-2w", "wsgi", lambda: BenchServer(WSGI, "--spares", "1", "--max-workers", "2")),
        ("gunicorn", "wsgi", lambda: _gunicorn()),
    ]
    results: dict[str, dict] = {}
    for name, kind, start in servers:
        server = start()
        try:
            load(server.port, min(seconds, 2.0), generator)  # warm-up
            results[f"{name}/{kind}"] = load(server.port, seconds, generator)
        finally:
            server.stop()
    rows = []
    raw_rps = results["raw/asgi"]["rps"]
    for key, r in results.items():
        kind = key.split("/")[1]
        base = results["uvicorn/asgi" if kind == "asgi" else "gunicorn/wsgi"]["rps"]
        r["ratio_to_baseline"] = r["rps"] / base if base else 0.0
        r["ratio_to_raw"] = r["rps"] / raw_rps if raw_rps else 0.0
        rows.append(
            [key, r["rps"], r["p50_ms"], r["p99_ms"], r["ratio_to_baseline"], r["ratio_to_raw"]]
        )
    print(f"load generator: {generator}, {CONNECTIONS} connections, {seconds:.0f} s each")
    print(
        table(
            ["server/app", "req/s", "p50 ms", "p99 ms", "x uvicorn/gunicorn", "x raw"],
            rows,
        )
    )
    latency = added_latency(200 if ctx.quick else 3000)
    goals = {}
    for label, key, base, least in THROUGHPUT_GOALS:
        ratio = results[key]["rps"] / results[base]["rps"] if results[base]["rps"] else 0.0
        goals[label] = {"measured": ratio, "goal": least, "met": ratio >= least}
    added = latency["added_p50_ms"]
    goals["warm added latency p50 <= 100 us over raw uvloop + httptools"] = {
        "measured": added,
        "goal": ADDED_LATENCY_GOAL_MS,
        "met": added <= ADDED_LATENCY_GOAL_MS,
    }
    print(
        f"\nadded latency, one connection, {latency['n']} requests each, interleaved: raw p50 "
        f"{latency['raw_p50_ms'] * 1000:.0f} µs, hourai warm p50 "
        f"{latency['warm_p50_ms'] * 1000:.0f} µs: +{added * 1000:.0f} µs"
    )
    print()
    print(
        table(
            ["goal", "measured", "met"],
            [
                [label, _figure(label, v["measured"]), "met" if v["met"] else "NOT met"]
                for label, v in goals.items()
            ],
        )
    )
    result = {
        "generator": generator,
        "connections": CONNECTIONS,
        "seconds": seconds,
        "servers": results,
        "latency": latency,
        "goals": goals,
    }
    ctx.path("warm.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def added_latency(n: int, rounds: int = 10) -> dict:
    """Sequential requests on one kept-alive connection, raw server and warm hourai worker
    in alternating rounds: medians of each and their difference."""
    raw = _raw()
    hourai = BenchServer(HELLO, "--spares", "0")
    try:
        clients = {"raw": Client(raw.port), "warm": Client(hourai.port)}
        samples: dict[str, list[float]] = {"raw": [], "warm": []}
        for client in clients.values():
            for _ in range(max(50, n // 20)):  # warm-up (the first request forks the worker)
                client.get("/")
        per_round = max(1, n // rounds)
        for _ in range(rounds):
            for name, client in clients.items():
                for _ in range(per_round):
                    status, _headers, _body, ms = client.get("/")
                    if status != 200:
                        raise RuntimeError(f"{name}: HTTP {status}")
                    samples[name].append(ms)
        for client in clients.values():
            client.close()
    finally:
        hourai.stop()
        raw.stop()
    raw_p50 = statistics.median(samples["raw"])
    warm_p50 = statistics.median(samples["warm"])
    return {
        "n": len(samples["warm"]),
        "raw_p50_ms": raw_p50,
        "warm_p50_ms": warm_p50,
        "added_p50_ms": warm_p50 - raw_p50,
        "raw_p99_ms": percentile(samples["raw"], 99),
        "warm_p99_ms": percentile(samples["warm"], 99),
    }


def _figure(label: str, measured: float) -> str:
    return f"{measured * 1000:.0f} µs" if "latency" in label else f"{measured:.2f}x"


def _raw() -> External:
    port = _free_port()
    return External([sys.executable, "-m", "bench.rawserver", str(port)], port)


def _uvicorn() -> External:
    port = _free_port()
    return External(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--log-level",
            "warning",
            "--no-access-log",
            "--app-dir",
            str(ASGI.parent),
            "app:app",
            "--port",
            str(port),
        ],
        port,
    )


def _gunicorn() -> External:
    port = _free_port()
    return External(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-w",
            "1",
            "--chdir",
            str(WSGI.parent),
            "-b",
            f"127.0.0.1:{port}",
            "app:application",
        ],
        port,
    )
