"""The durable queue's costs: accept latency (one event, committed), group-committed
accepts under concurrency, and the full cycle (accept, claim, succeed) per event.

``python -m bench.async_queue [--dir DIR] [-n N]`` — DIR is where the database lives (the
state dir's disk matters: fsync is the cost); default a temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from hourai.invocations.queue import Accept, InvocationQueue
from hourai.invocations.runner import AsyncStore


def _ms(values: list[float]) -> str:
    values = sorted(values)
    p50 = statistics.median(values) * 1e3
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))] * 1e3
    return f"p50 {p50:.3f} ms, p99 {p99:.3f} ms"


async def run(where: Path, n: int) -> None:
    queue = InvocationQueue(where / "bench.db")
    store = AsyncStore(queue)
    event = b'{"order": 12345, "items": [1, 2, 3]}'
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        await store.accept(Accept("f", event))
        lat.append(time.perf_counter() - t0)
    print(f"accept, one at a time ({n}): {_ms(lat)}; {n / sum(lat):.0f}/s")

    for concurrent in (16, 128):
        gate = asyncio.Semaphore(concurrent)

        async def one(gate: asyncio.Semaphore = gate) -> None:
            async with gate:
                await store.accept(Accept("g", event))

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        dt = time.perf_counter() - t0
        print(f"accept, {concurrent} callers at once: {n / dt:.0f}/s (group commit)")

    t0 = time.perf_counter()
    done = 0
    while done < n:
        claimed = await store.call(queue.claim, "f", time.time(), 10)
        if not claimed:
            break
        for inv in claimed:
            await store.call(queue.succeed, inv.id, inv.attempt, time.time(), 200, b"{}")
        done += len(claimed)
    dt = time.perf_counter() - t0
    print(f"claim (batches of 10) + succeed each: {done / dt:.0f} events/s")
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, help="where the database lives (default: a temp dir)")
    parser.add_argument("-n", type=int, default=2000)
    args = parser.parse_args()
    where = args.dir or Path(tempfile.mkdtemp(prefix="hourai-bench-q-"))
    where.mkdir(parents=True, exist_ok=True)
    asyncio.run(run(where, args.n))


if __name__ == "__main__":
    main()
