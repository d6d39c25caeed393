"""What tracing costs the warm path: `python -m bench.tracing_cost [--rounds R] [-n N]`.

Two bench servers on the same function (examples/hello), one with ``--tracing`` pointed at
an OTLP/HTTP sink in this process that accepts and discards every export, one without.
Rounds alternate between them (so drift on a shared VM lands on both), each round N
sequential keep-alive requests to a warm worker; prints the median latency of each side and
the difference, in microseconds, as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bench.coldstart import REPO, BenchServer

HELLO = REPO / "examples" / "hello" / "handler.py"


class _Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    received = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        type(self).received += 1
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing_cost")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("-n", type=int, default=1000, help="requests per round")
    args = parser.parse_args(argv)
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{sink.server_address[1]}/v1/traces"
    servers = {
        "off": BenchServer(HELLO, "--spares", "0"),
        "on": BenchServer(HELLO, "--spares", "0", "--tracing", url),
    }
    samples: dict[str, list[float]] = {k: [] for k in servers}
    rounds: dict[str, list[float]] = {k: [] for k in servers}
    try:
        for server in servers.values():
            for _ in range(200):  # fork the worker, then warm both sides up
                server.sample("/", None)
        for _ in range(args.rounds):
            for key, server in servers.items():
                got = [server.sample("/", "warm") * 1000 for _ in range(args.n)]
                samples[key] += got
                rounds[key].append(statistics.median(got))
    finally:
        for server in servers.values():
            server.stop()
        sink.shutdown()
    off, on = statistics.median(samples["off"]), statistics.median(samples["on"])
    print(
        json.dumps(
            {
                "requests_per_side": len(samples["off"]),
                "median_us": {"off": round(off, 1), "on": round(on, 1)},
                "added_us": round(on - off, 1),
                "round_medians_us": {k: [round(v, 1) for v in r] for k, r in rounds.items()},
                "exports_received": _Sink.received,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
