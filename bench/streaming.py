"""First byte of a streaming response, hourai against uvicorn, same app, same run:
`python -m bench.streaming [--rounds N]`.

The app is a FastAPI ``StreamingResponse`` sending one server-sent event per second (three of
them; tests/functions/streams.py). Each round, interleaved, asks each server once on a new
connection (a warm worker: one warm-up request first) and records the time to the first
byte and to the end of the stream.
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FUNCTIONS = REPO / "tests" / "functions"
PATH = "/events?n=3&gap=1.0"


def _start(cmd: list[str], pattern: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    end = time.monotonic() + 120
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(pattern, line)
        if m:
            return proc, int(m.group(1)) if m.group(1).isdigit() else 0
    proc.kill()
    raise RuntimeError(f"{cmd[0:4]} did not start")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one(port: int) -> tuple[float, float]:
    """(seconds to the first byte, seconds to the end of the stream)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        t0 = time.perf_counter()
        sock.sendall(f"GET {PATH} HTTP/1.1\r\nhost: bench\r\n\r\n".encode())
        data = sock.recv(65536)
        first = time.perf_counter() - t0
        while not data.endswith(b"0\r\n\r\n"):
            more = sock.recv(65536)
            if not more:
                break
            data += more
        return first, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    target = f"{FUNCTIONS / 'streams.py'}:fastapi_app"
    servers = {}
    hourai, hport = _start(
        [sys.executable, "-m", "hourai", "run", target, "--port", "0", "--spares", "1"],
        r"serving .* at http://[\d.]+:(\d+)/",
    )
    servers["hourai"] = (hourai, hport)
    uport = _free_port()
    uvicorn, _ = _start(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "streams:fastapi_app",
            "--app-dir",
            str(FUNCTIONS),
            "--port",
            str(uport),
            "--log-level",
            "info",
            "--no-access-log",
        ],
        r"(Uvicorn running)",
    )
    servers["uvicorn"] = (uvicorn, uport)
    try:
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
        for _, port in servers.values():
            one(port)  # warm up
        for _ in range(args.rounds):
            for name, (_, port) in servers.items():
                results[name].append(one(port))
        for name, rows in results.items():
            firsts = [f * 1e3 for f, _ in rows]
            totals = [t for _, t in rows]
            print(
                f"{name:8s} first byte median {statistics.median(firsts):7.2f} ms "
                f"(min {min(firsts):.2f}, max {max(firsts):.2f}); "
                f"whole stream {statistics.median(totals):.3f} s"
            )
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
