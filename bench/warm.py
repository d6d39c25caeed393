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

All servers are up at once, idle but for the one under load, and the load comes in rounds
(5 of 2 s each), every server in each round: a burst of the machine's other work falls on
all of them, not on whichever ran at that moment. ``--baseline-tree DIR`` adds the hourai
rows of another checkout (``base-*``), for a before/after in the same run.

Each figure is printed against its goal (issue 14), as a ratio to its baseline in the same
run; the machine is shared and noisy, so compare runs by these ratios, not by req/s
(``python -m bench.median`` takes the medians of several runs).
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
from pathlib import Path
from typing import Any

from bench.coldstart import HELLO, REPO, BenchServer
from bench.common import BenchContext, percentile, table
from bench.httpclient import Client
from bench.loadgen import run_load

ASGI = REPO / "examples" / "asgi_plain" / "app.py"
WSGI = REPO / "examples" / "wsgi_plain" / "app.py"
CONNECTIONS = 16
ROUNDS = 5

# Issue 14's goals: (label, server/app, baseline, least ratio to it).
THROUGHPUT_GOALS = [
    ("ASGI, thread mode (concurrency 16) >= 1.0x uvicorn", "hourai-c16/asgi", "uvicorn/asgi", 1.0),
    ("ASGI, process mode, 1 worker >= 0.5x uvicorn", "hourai-1w/asgi", "uvicorn/asgi", 0.5),
    ("WSGI, 1 worker >= 2x gunicorn (1 sync worker)", "hourai-1w/wsgi", "gunicorn/wsgi", 2.0),
]
ADDED_LATENCY_GOAL_MS = 0.100  # warm p50 over the raw uvloop + httptools server
ADDED_LABEL = "warm added latency p50 <= 100 us over raw uvloop + httptools"


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


def _servers(tree: Path | None = None, prefix: str = "hourai") -> list[tuple[str, str, Any]]:
    """The hourai rows: of this tree, or (``tree``) of another checkout, for before/after."""
    asgi, wsgi = (
        (ASGI, WSGI)
        if tree is None
        else (tree / ASGI.relative_to(REPO), tree / WSGI.relative_to(REPO))
    )
    return [
        (
            f"{prefix}-1w",
            "asgi",
            lambda: BenchServer(asgi, "--spares", "0", "--max-workers", "1", tree=tree),
        ),
        (
            f"{prefix}-2w",
            "asgi",
            lambda: BenchServer(asgi, "--spares", "1", "--max-workers", "2", tree=tree),
        ),
        (
            f"{prefix}-c16",
            "asgi",
            lambda: BenchServer(
                asgi, "--spares", "0", "--max-workers", "1", "--concurrency", "16", tree=tree
            ),
        ),
        (
            f"{prefix}-1w",
            "wsgi",
            lambda: BenchServer(wsgi, "--spares", "0", "--max-workers", "1", tree=tree),
        ),
        (
            f"{prefix}-2w",
            "wsgi",
            lambda: BenchServer(wsgi, "--spares", "1", "--max-workers", "2", tree=tree),
        ),
    ]


def _combine(rounds: list[dict]) -> dict:
    return {
        "rps": statistics.fmean(r["rps"] for r in rounds),
        "p50_ms": statistics.median(r["p50_ms"] for r in rounds),
        "p99_ms": statistics.median(r["p99_ms"] for r in rounds),
        "errors": sum(r["errors"] for r in rounds),
        "rounds_rps": [r["rps"] for r in rounds],
    }


def run(ctx: BenchContext) -> dict:
    seconds = 0.3 if ctx.quick else 10.0
    rounds = 1 if ctx.quick else ROUNDS
    generator = "wrk" if shutil.which("wrk") else "builtin"
    servers = [
        ("raw", "asgi", _raw),
        ("uvicorn", "asgi", _uvicorn),
        ("gunicorn", "wsgi", _gunicorn),
        *_servers(),
    ]
    baseline = ctx.extra.get("baseline_tree")
    if baseline:
        servers += _servers(Path(baseline).resolve(), "base")
    started: dict[str, Any] = {}
    samples: dict[str, list[dict]] = {}
    try:
        for name, kind, start in servers:
            started[f"{name}/{kind}"] = start()
        for server in started.values():
            if not ctx.quick:  # (quick: that it runs, not what it measures)
                load(server.port, min(seconds, 2.0), generator)  # warm-up
        # Rounds, every server in each: a burst of the machine's other load falls on all.
        for _ in range(rounds):
            for key, server in started.items():
                samples.setdefault(key, []).append(load(server.port, seconds / rounds, generator))
    finally:
        for server in started.values():
            server.stop()
    results = {key: _combine(samples[key]) for key in sorted(samples, key=_order)}
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
    print(
        f"load generator: {generator}, {CONNECTIONS} connections, {seconds:.0f} s each "
        f"in {rounds} interleaved rounds"
    )
    print(
        table(
            ["server/app", "req/s", "p50 ms", "p99 ms", "x uvicorn/gunicorn", "x raw"],
            rows,
        )
    )
    latency = added_latency(
        200 if ctx.quick else 3000, baseline=Path(baseline).resolve() if baseline else None
    )
    goals = {}
    for label, key, base, least in THROUGHPUT_GOALS:
        ratio = results[key]["rps"] / results[base]["rps"] if results[base]["rps"] else 0.0
        goals[label] = {"measured": ratio, "goal": least, "met": ratio >= least}
    added = latency["added_p50_ms"]
    goals[ADDED_LABEL] = {
        "measured": added,
        "goal": ADDED_LATENCY_GOAL_MS,
        "met": added <= ADDED_LATENCY_GOAL_MS,
    }
    print(
        f"\nadded latency, one connection, {latency['n']} requests each, interleaved: raw p50 "
        f"{latency['raw_p50_ms'] * 1000:.0f} µs, hourai warm p50 "
        f"{latency['warm_p50_ms'] * 1000:.0f} µs: +{added * 1000:.0f} µs"
        + (
            f" (baseline tree: +{latency['base_added_p50_ms'] * 1000:.0f} µs)"
            if "base_added_p50_ms" in latency
            else ""
        )
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
        "rounds": rounds,
        "baseline_tree": baseline or None,
        "servers": results,
        "latency": latency,
        "goals": goals,
    }
    ctx.path("warm.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def added_latency(n: int, rounds: int = 10, baseline: Path | None = None) -> dict:
    """Sequential requests on one kept-alive connection, raw server and warm hourai worker
    (and the baseline tree's) in alternating rounds: medians of each and the differences."""
    servers: dict[str, Any] = {"raw": _raw(), "warm": BenchServer(HELLO, "--spares", "0")}
    try:
        if baseline is not None:
            hello = baseline / HELLO.relative_to(REPO)
            servers["base"] = BenchServer(hello, "--spares", "0", tree=baseline)
        clients = {name: Client(server.port) for name, server in servers.items()}
        samples: dict[str, list[float]] = {name: [] for name in clients}
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
        for server in servers.values():
            server.stop()
    raw_p50 = statistics.median(samples["raw"])
    out = {"n": len(samples["warm"]), "raw_p50_ms": raw_p50}
    for name in samples:
        if name != "raw":
            out[f"{name}_p50_ms"] = statistics.median(samples[name])
            out[f"{name}_p99_ms"] = percentile(samples[name], 99)
    out["raw_p99_ms"] = percentile(samples["raw"], 99)
    out["added_p50_ms"] = out["warm_p50_ms"] - raw_p50
    if "base" in samples:
        out["base_added_p50_ms"] = out["base_p50_ms"] - raw_p50
    return out


def _order(key: str) -> tuple[int, str]:
    name, kind = key.split("/")
    return (kind != "asgi", name not in ("raw", "uvicorn", "gunicorn"), name)


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
