"""A built-in HTTP load generator for machines without `wrk`.

N kept-alive connections, each sending the next request as soon as the last answer is in,
for a fixed time, on one asyncio loop (uvloop when present). It records every latency, so
medians and p99s are exact, not histogram estimates. Being Python, it saturates sooner than
wrk: compare servers only against each other within one run of the same generator.
"""

from __future__ import annotations

import asyncio
import time

from bench.common import percentile

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


async def _client(port: int, until: float, latencies: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            fields = dict(
                (name.strip().lower(), value.strip().lower())
                for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
            )
            if fields.get(b"transfer-encoding") == b"chunked":
                while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                    await reader.readexactly(size + 2)
                await reader.readuntil(b"\r\n")
            else:
                await reader.readexactly(int(fields.get(b"content-length", b"0")))
            latencies.append((time.perf_counter() - t0) * 1000)
            if status >= 400:
                errors.append(status)
            if fields.get(b"connection") == b"close":
                # A server without keep-alive (gunicorn's sync worker): pay the reconnect in
                # the next request's latency, as its clients do.
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
    finally:
        writer.close()


def run_load(port: int, connections: int, seconds: float) -> dict:
    async def main() -> dict:
        latencies: list[float] = []
        errors: list[int] = []
        start = time.perf_counter()
        until = start + seconds
        await asyncio.gather(*(_client(port, until, latencies, errors) for _ in range(connections)))
        elapsed = time.perf_counter() - start
        return {
            "rps": len(latencies) / elapsed,
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "errors": len(errors),
        }

    try:
        import uvloop

        return uvloop.run(main())
    except ImportError:  # pragma: no cover
        return asyncio.run(main())
