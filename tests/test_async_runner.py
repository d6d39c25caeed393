"""The runner against a fake runtime: throttling is not an attempt, a stop hands running
events back uncounted, the concurrency cap holds, and a caller that goes away mid-commit
strands nobody."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from hourai.invocations.queue import QUEUED, SUCCEEDED, Accept, InvocationQueue
from hourai.invocations.runner import AsyncConfig, AsyncStore, Outcome, Runner


async def _until(pred, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_throttled_is_retried_without_counting(tmp_path: Path) -> None:
    calls = 0

    async def invoke(name: str, event: bytes, timeout: float | None, *_: Any) -> Outcome:
        nonlocal calls
        calls += 1
        if calls <= 2:
            return Outcome(429, b"", "rate limited", throttled=True)
        return Outcome(200, b'"done"')

    async def main() -> None:
        store = AsyncStore(InvocationQueue(tmp_path / "q.db"))
        runner = Runner(store, invoke)
        runner.configure("f", AsyncConfig(retries=0, concurrency=1))
        task = asyncio.create_task(runner.run())
        iid = await store.accept(Accept("f", b"{}", max_attempts=1))
        await _until(lambda: runner.outcomes.get(("f", "succeeded")) == 1, timeout=15)
        inv = await store.call(store.queue.get, iid)
        assert inv is not None and inv.status == SUCCEEDED and inv.attempt == 1
        assert runner.outcomes[("f", "throttled")] == 2
        task.cancel()
        await runner.stop()
        store.close()

    asyncio.run(main())


def test_stop_hands_back_what_runs_and_the_cap_holds(tmp_path: Path) -> None:
    running = 0
    peak = 0

    async def invoke(name: str, event: bytes, timeout: float | None, *_: Any) -> Outcome:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(30)
        finally:
            running -= 1
        return Outcome(200, b"")

    async def main() -> None:
        store = AsyncStore(InvocationQueue(tmp_path / "q.db"))
        runner = Runner(store, invoke)
        runner.configure("f", AsyncConfig(concurrency=3))
        task = asyncio.create_task(runner.run())
        ids = [await store.accept(Accept("f", b"{}")) for _ in range(10)]
        await _until(lambda: running == 3)
        await asyncio.sleep(0.2)
        assert peak == 3
        await runner.stop()
        task.cancel()
        rows = [await store.call(store.queue.get, i) for i in ids]
        assert all(r is not None and r.status == QUEUED and r.attempt == 0 for r in rows)
        store.close()

    asyncio.run(main())


def test_a_caller_cancelled_mid_commit_strands_nobody(tmp_path: Path) -> None:
    async def main() -> None:
        store = AsyncStore(InvocationQueue(tmp_path / "q.db"))
        first = asyncio.create_task(store.accept(Accept("f", b"1")))
        others = [asyncio.create_task(store.accept(Accept("f", b"2"))) for _ in range(20)]
        await asyncio.sleep(0)
        first.cancel()
        ids = await asyncio.wait_for(asyncio.gather(*others), 10)
        assert len(set(ids)) == 20
        depth = await store.call(store.queue.depth)
        assert depth["f"][QUEUED] in (20, 21)  # the cancelled one may have been committed
        store.close()

    asyncio.run(main())
