"""Warm path: throughput and latency of hourai against uvicorn and gunicorn, same app.

The same ASGI app (examples/asgi_plain) under hourai and under uvicorn (one process, uvloop,
httptools); the same WSGI app (examples/wsgi_plain) under hourai and under gunicorn (one
sync worker). One load generator for all, same connections, same duration, back to back in
one run: `wrk` when it is installed, else the built-in one in bench/loadgen.py (the JSON
says which). hourai runs with one worker (hourai-1w: one process serving the function, like
uvicorn and gunicorn here, plus the daemon) and with two (hourai-2w: one per core); every
request crosses its extra process hop, daemon → worker → daemon.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time

from bench.coldstart import REPO, BenchServer
from bench.common import BenchContext, table
from bench.loadgen import run_load

ASGI = REPO / "examples" / "asgi_plain" / "app.py"
WSGI = REPO / "examples" / "wsgi_plain" / "app.py"
CONNECTIONS = 16


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
        ("hourai-1w", "asgi", lambda: BenchServer(ASGI, "--spares", "0", "--max-workers", "1")),
        ("hourai-2w", "asgi", lambda: BenchServer(ASGI, "--spares", "1", "--max-workers", "2")),
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
    for key, r in results.items():
        kind = key.split("/")[1]
        base = results["uvicorn/asgi" if kind == "asgi" else "gunicorn/wsgi"]["rps"]
        r["ratio_to_baseline"] = r["rps"] / base if base else 0.0
        rows.append([key, r["rps"], r["p50_ms"], r["p99_ms"], r["ratio_to_baseline"]])
    print(f"load generator: {generator}, {CONNECTIONS} connections, {seconds:.0f} s each")
    print(table(["server/app", "req/s", "p50 ms", "p99 ms", "x baseline (uvicorn/gunicorn)"], rows))
    result = {
        "generator": generator,
        "connections": CONNECTIONS,
        "seconds": seconds,
        "servers": results,
    }
    ctx.path("warm.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


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
