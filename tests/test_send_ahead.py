"""A busy process-mode worker is sent its next invocation ahead, in a real runtime.

The request sent ahead waits in the worker's channel while the one before it runs. When
that worker dies or times out first, the request it never started is dispatched again to
another worker and answered once, by that worker; the one that was running gets its 502
or 504 as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from conftest import FUNCTIONS

from hourai.daemon import Runtime, RuntimeSettings
from hourai.ingress import Request, Response
from hourai.isolate.loader import resolve_target
from hourai.registry import FunctionSpec, build_spec
from hourai.scheduler import core
from hourai.scheduler.core import FunctionLimits

BEHAVE = FUNCTIONS / "behave.py"
HOSTILE = FUNCTIONS / "hostile_worker.py"


@pytest.fixture(autouse=True)
def _fast_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    # On a loaded test machine a 1 ms invocation can take 10: still "fast" for these tests.
    monkeypatch.setattr(core, "AHEAD_MAX_SERVICE", 0.25)


def _request(target: str) -> Request:
    path, _, query = target.partition("?")
    return Request(
        "GET", target, path, query, [], b"", "1.1", ("127.0.0.1", 1), ("127.0.0.1", 2), True
    )


def _start(response: Response) -> str:
    return dict(response.headers)["x-hourai-start"]


Scenario = Callable[[Runtime, FunctionSpec], Awaitable[None]]


def _run(scenario: Scenario, function: Path = BEHAVE, **limits: float) -> None:
    async def main() -> None:
        runtime = Runtime(RuntimeSettings(policy=None))
        await runtime.start()
        try:
            spec = build_spec(
                runtime.codestore,
                "b",
                resolve_target(str(function)),
                limits=FunctionLimits(spares=0, max_workers=1, **limits),  # type: ignore[arg-type]
            )
            await runtime.deploy(spec)
            for _ in range(3):  # a warm worker, and a measured (short) invocation time
                assert (await runtime.invoke(spec, _request("/pid"), "", "/pid")).status == 200
            await scenario(runtime, spec)
        finally:
            await runtime.stop()

    asyncio.run(main())


async def _one_running_one_ahead(
    runtime: Runtime, spec: FunctionSpec, first: str
) -> tuple[asyncio.Task[Response], asyncio.Task[Response], int]:
    """``first`` starts on the warm worker; ``/pid`` is sent ahead to it."""
    (wid,) = runtime.workers
    request = _request(first)
    running = asyncio.ensure_future(runtime.invoke(spec, request, "", request.path))
    while not runtime.workers[wid].inflight:
        await asyncio.sleep(0)
    ahead = asyncio.ensure_future(runtime.invoke(spec, _request("/pid"), "", "/pid"))
    while len(runtime.workers[wid].inflight) < 2:
        await asyncio.sleep(0)
    rid = max(runtime.workers[wid].inflight)
    assert runtime.scheduler.sent_ahead(wid) == rid, "the second request was not sent ahead"
    return running, ahead, wid


def test_a_worker_that_dies_with_a_request_sent_ahead_leaves_it_to_another() -> None:
    async def scenario(runtime: Runtime, spec: FunctionSpec) -> None:
        before = (await runtime.invoke(spec, _request("/pid"), "", "/pid")).body
        running, ahead, wid = await _one_running_one_ahead(runtime, spec, "/sleep-exit?s=0.3")
        died = await running
        assert died.status == 502 and b"exit" in died.body, died.body
        served = await ahead
        assert served.status == 200, served.body
        # by the replacement, forked for it once the first worker was gone
        assert _start(served) == "fork"
        assert served.body != before and wid not in runtime.workers
        assert runtime.scheduler.stats("b")["completed"] >= 4

    _run(scenario)


def test_a_timeout_kills_the_worker_and_the_request_sent_ahead_is_never_run_twice() -> None:
    async def scenario(runtime: Runtime, spec: FunctionSpec) -> None:
        running, ahead, wid = await _one_running_one_ahead(runtime, spec, "/sleep?s=5")
        timed_out = await running
        assert timed_out.status == 504 and b"timed out after 0.5s" in timed_out.body
        # it may have started in the instant between the two: answered, never run again
        failed = await ahead
        assert failed.status == 502 and b"the invocation before it timed out" in failed.body
        assert wid not in runtime.workers
        after = await runtime.invoke(spec, _request("/pid"), "", "/pid")
        assert after.status == 200  # the function serves on, from a new worker
        stats = runtime.scheduler.stats("b")
        assert stats["timeouts"] == 1 and stats["kills"] == {"timeout": 1}

    _run(scenario, timeout=0.5)


def test_a_worker_answering_what_was_sent_ahead_before_its_turn_is_killed() -> None:
    async def scenario(runtime: Runtime, spec: FunctionSpec) -> None:
        running, ahead, wid = await _one_running_one_ahead(runtime, spec, "/answer-next?s=0.2")
        broke = await running
        assert broke.status == 502 and b"before the one it was running" in broke.body
        served = await ahead  # not the forged answer: run again, by a new worker
        assert served.status == 200 and served.body == b"hostile but quiet", served.body
        assert _start(served) == "fork" and wid not in runtime.workers

    _run(scenario, HOSTILE)


def test_requests_sent_ahead_are_answered_in_order_one_at_a_time() -> None:
    async def scenario(runtime: Runtime, spec: FunctionSpec) -> None:
        (wid,) = runtime.workers
        order: list[int] = []
        ahead: set[int | None] = set()
        tasks = []
        for i in range(50):
            task = asyncio.ensure_future(runtime.invoke(spec, _request("/echo"), "", "/echo"))
            task.add_done_callback(lambda _t, i=i: order.append(i))
            tasks.append(task)
        while not all(t.done() for t in tasks):
            ahead.add(runtime.scheduler.sent_ahead(wid))
            await asyncio.sleep(0)
        await asyncio.sleep(0)  # the last done callback
        assert [t.result().status for t in tasks] == [201] * 50
        assert order == list(range(50))  # FIFO, one at a time
        assert len(ahead - {None}) > 10, "hardly anything was sent ahead"
        stats = runtime.scheduler.stats("b")
        assert stats["workers"]["idle"] == 1 and stats["starts"]["fork"] == 1

    _run(scenario)
