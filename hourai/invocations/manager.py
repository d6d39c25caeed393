"""Every way in that is not an HTTP request, behind one object the daemon owns.

:class:`Invocations` holds the durable queue and its runner, the schedules and the queue
triggers. The daemon tells it which functions serve with which options
(:meth:`Invocations.configure`, :meth:`Invocations.forget`) and hands it one callable that
invokes a function (:class:`~hourai.invocations.runner.InvokeEvent`); everything else —
retries, destinations, ticks, consumers — happens here, in tasks it owns and stops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Coroutine, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from hourai.invocations.queue import QUEUED, STATUSES, InvocationQueue, QueueError
from hourai.invocations.runner import AsyncConfig, AsyncStore, InvokeEvent, Runner
from hourai.invocations.schedule import Rate, Schedule, parse
from hourai.invocations.triggers import make_source
from hourai.invocations.triggers.base import BatchConsumer

log = logging.getLogger("hourai.invocations")

DB_NAME = "invocations.db"
RETENTION = 86400.0  # results of succeeded invocations are kept this long
DEAD_RETENTION = 14 * 86400.0  # dead letters: SQS's longest retention
PURGE_INTERVAL = 60.0
DEPTH_INTERVAL = 5.0  # the queue's depth for `hourai show` is read this often (scrapes: live)
SCHEDULE_RESYNC = 30.0  # a sleeping ticker re-reads the wall clock at least this often


def scheduled_event(function: str, tick: datetime) -> bytes:
    """EventBridge's scheduled event, as a Lambda target receives it."""
    return json.dumps(
        {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": "Scheduled Event",
            "source": "aws.events",
            "account": "000000000000",
            "time": tick.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "region": "local",
            "resources": [f"arn:hourai:events:local:0:rule/{function}"],
            "detail": {},
        },
        separators=(",", ":"),
    ).encode()


def async_config(options: Mapping[str, Any], capacity: int) -> AsyncConfig:
    """A function's async settings from its options (defaults filled by the caller). The
    default concurrency is a quarter of what the function can run, so queued events never
    take the room synchronous callers need."""
    concurrency = options.get("async_concurrency") or max(1, capacity // 4)
    return AsyncConfig(
        retries=int(options.get("async_retries", 2)),
        max_age=float(options.get("async_max_age", 21600.0)),
        retry_delay=float(options.get("async_retry_delay", 60.0)),
        concurrency=min(concurrency, capacity),
        timeout=options.get("async_timeout"),
        on_success=options.get("on_success"),
        on_failure=options.get("on_failure"),
    )


class Invocations:
    def __init__(
        self,
        state_dir: Path,
        invoke: InvokeEvent,
        *,
        retention: float = RETENTION,
        dead_retention: float = DEAD_RETENTION,
    ) -> None:
        self.path = state_dir / DB_NAME
        self.invoke = invoke
        self.retention = retention
        self.dead_retention = dead_retention
        self.store: AsyncStore | None = None
        self.runner: Runner | None = None
        self.schedules: dict[str, tuple[str, asyncio.Task[None]]] = {}
        self.missed: dict[str, str] = {}
        self.ticks: dict[str, int] = {}
        self.triggers: dict[str, tuple[dict[str, Any], BatchConsumer, asyncio.Task[None]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._depth: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ life cycle

    async def open(self) -> None:
        """Open the store and put back what was running when the daemon died. Raises
        QueueError."""
        queue = await asyncio.to_thread(InvocationQueue, self.path)
        self.store = AsyncStore(queue)
        back = await self.store.call(queue.recover, time.time())
        if back:
            log.warning("%d async invocations were running when hourai stopped: queued again", back)
        self.runner = Runner(self.store, self.invoke)
        self._spawn(self.runner.run(), "async invocation runner")
        self._spawn(self._purge(), "async invocation purge")

    def pause(self) -> None:
        """The daemon is stopping: start nothing new (what runs may finish in the drain);
        queued events, ticks and stream entries wait for the next start."""
        if self.runner is not None:
            self.runner.claiming = False
        for _, task in self.schedules.values():
            task.cancel()
        for _, _, task in self.triggers.values():
            task.cancel()

    async def stop(self) -> None:
        for _, task in self.schedules.values():
            task.cancel()
        for _, _, task in self.triggers.values():
            task.cancel()
        if self.runner is not None:
            self.runner.claiming = False
            await self.runner.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
            self.store = None

    def _spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
        """Every task is owned here: kept, cancelled at stop, its failure logged."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("%s failed", what, exc_info=t.exception())

        task.add_done_callback(done)
        return task

    async def _purge(self) -> None:
        """Forget what is past its retention; keep the depth `hourai show` prints fresh."""
        assert self.store is not None
        purged_at = 0.0
        while True:
            try:
                if time.monotonic() - purged_at >= PURGE_INTERVAL:
                    purged_at = time.monotonic()
                    gone = await self.store.call(
                        self.store.queue.purge, time.time(), self.retention, self.dead_retention
                    )
                    if gone:
                        log.info("purged %d async invocations past their retention", gone)
                    # events of functions that never came (a destination not deployed)
                    await self.store.call(self.store.queue.expire, None, time.time())
                await self.refresh()
            except QueueError as exc:
                log.error("%s", exc)
            await asyncio.sleep(DEPTH_INTERVAL)

    # ------------------------------------------------------------------ functions

    def configure(self, name: str, options: Mapping[str, Any], capacity: int) -> None:
        """``name`` serves with these options (the defaults overlaid with its own)."""
        assert self.runner is not None
        config = async_config(options, capacity)
        self.runner.configure(name, config)
        expr = options.get("schedule")
        current = self.schedules.get(name)
        if current is not None and current[0] != expr:
            current[1].cancel()
            del self.schedules[name]
            self.missed.pop(name, None)
            if not expr and self.store is not None:  # the new version has none
                self._spawn(self.store.call(self.store.queue.drop_schedule, name), "schedule drop")
            current = None
        if expr and current is None:
            task = self._spawn(self._ticker(name, expr), f"schedule of {name}")
            self.schedules[name] = (expr, task)
        trigger = options.get("trigger")
        running = self.triggers.get(name)
        if running is not None and running[0] != trigger:
            running[2].cancel()
            del self.triggers[name]
            running = None
        if trigger and running is None:
            consumer = _make_consumer(name, dict(trigger), self.invoke, config, capacity)
            task = self._spawn(consumer.run(), f"trigger of {name}")
            self.triggers[name] = (dict(trigger), consumer, task)
            log.info("%s: consuming %s", name, consumer.source.description)

    async def forget(self, name: str) -> None:
        """``name`` was removed: no more ticks or consumption; its queued events become
        dead letters (kept, with why)."""
        if self.runner is not None:
            self.runner.forget(name)
        sched = self.schedules.pop(name, None)
        if sched is not None:
            sched[1].cancel()
        trigger = self.triggers.pop(name, None)
        if trigger is not None:
            trigger[2].cancel()
        self.missed.pop(name, None)
        if self.store is not None:
            queue = self.store.queue
            n = await self.store.call(queue.dead_letter, name, time.time(), "function removed")
            await self.store.call(queue.drop_schedule, name)
            if n:
                log.warning("%s removed: its %d queued async invocations are dead letters", name, n)

    # ------------------------------------------------------------------ the way in

    async def accept(
        self, name: str, event: bytes, source: str = "api", traceparent: str | None = None
    ) -> str:
        """Durably queue an event for ``name``, with the trace context that accepted it
        (its runs link to it); returns its id (QueueError if the disk refuses)."""
        assert self.store is not None and self.runner is not None
        config = self.runner.configs.get(name, AsyncConfig())
        iid = await self.store.accept(config.accept(name, event, source, traceparent))
        self.runner.wake()
        return iid

    async def get(self, name: str, iid: str) -> dict[str, Any] | None:
        assert self.store is not None
        inv = await self.store.call(self.store.queue.get, iid)
        if inv is None or inv.function != name:
            return None
        return inv.describe(with_event=True)

    async def list(
        self, name: str, limit: int = 50, status: str | None = None
    ) -> list[dict[str, Any]]:
        assert self.store is not None
        rows = await self.store.call(self.store.queue.list, name, limit, status)
        return [r.describe() for r in rows]

    def describe(self, name: str) -> dict[str, Any]:
        """For ``hourai show``: async settings, schedule (and missed ticks), trigger."""
        doc: dict[str, Any] = {}
        if self.runner is not None and name in self.runner.configs:
            c = self.runner.configs[name]
            doc["async"] = {
                "retries": c.retries,
                "max_age": c.max_age,
                "concurrency": c.concurrency,
                "timeout": c.timeout,
                "on_success": c.on_success,
                "on_failure": c.on_failure,
                "queue": self._depth.get(name),
            }
        if name in self.schedules:
            doc["schedule"] = {
                "expression": self.schedules[name][0],
                "ticks": self.ticks.get(name, 0),
                "missed": self.missed.get(name),
            }
        if name in self.triggers:
            doc["trigger"] = self.triggers[name][1].describe()
        return doc

    # ------------------------------------------------------------------ schedules

    async def _ticker(self, name: str, expr: str) -> None:
        assert self.store is not None
        schedule = parse(expr)
        queue = self.store.queue
        now = datetime.now(UTC)
        state = await self.store.call(queue.schedule_state, name)
        if state is not None and state[0] == expr:
            last = datetime.fromtimestamp(state[1], UTC)
            if state[3]:
                self.missed[name] = state[3]
            n, latest = schedule.between(last, now, last)
            if n and latest is not None:
                note = (
                    f"{n} tick{'s' if n > 1 else ''} missed while hourai was down "
                    f"({_iso(schedule_first(schedule, last))} to {_iso(latest)}); the latest was "
                    "delivered once, late, the rest are not replayed"
                )
                log.warning("%s: schedule %s: %s", name, expr, note)
                self.missed[name] = note
                await self._fire(name, latest)
                await self.store.call(queue.set_schedule, name, expr, latest.timestamp(), n, note)
                last = latest
        else:
            # new (or changed) schedule: it starts now, with nothing owed
            last = now
            await self.store.call(queue.set_schedule, name, expr, now.timestamp(), 0, "")
        while True:
            tick = _next(schedule, last)
            if tick is None:
                log.warning("%s: schedule %s fires no more", name, expr)
                return
            wait = (tick - datetime.now(UTC)).total_seconds()
            if wait > 0:
                await asyncio.sleep(min(wait, SCHEDULE_RESYNC))
                continue
            try:
                await self._fire(name, tick)
                await self.store.call(queue.set_schedule, name, expr, tick.timestamp())
            except QueueError as exc:
                log.error("%s: the tick of %s was not queued: %s", name, _iso(tick), exc)
            last = tick

    async def _fire(self, name: str, tick: datetime) -> None:
        # No trace context: nothing caused a tick but the clock, so each run starts a trace.
        iid = await self.accept(name, scheduled_event(name, tick), "schedule")
        self.ticks[name] = self.ticks.get(name, 0) + 1
        log.info("%s: scheduled event for %s queued as %s", name, _iso(tick), iid)

    # ------------------------------------------------------------------ metrics

    async def refresh(self) -> None:
        """Read the queue's depth for the next scrape (off the loop, in the store's thread)."""
        if self.store is not None:
            self._depth = await self.store.call(self.store.queue.depth)

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "hourai_async_queue_depth",
            "async invocations by function and status (queued, running, succeeded, dead)",
            labels=["function", "status"],
        )
        oldest = GaugeMetricFamily(
            "hourai_async_oldest_age_seconds",
            "age of the oldest queued async invocation",
            labels=["function"],
        )
        now = time.time()
        for fn, entry in sorted(self._depth.items()):
            for status in STATUSES:
                depth.add_metric([fn, status], entry.get(status, 0))
            if entry.get(QUEUED) and entry.get("oldest") is not None:
                oldest.add_metric([fn], max(0.0, now - entry["oldest"]))
        yield depth
        yield oldest
        outcomes = CounterMetricFamily(
            "hourai_async_outcomes",
            "async invocations by outcome (succeeded, retried, dead_lettered, throttled, expired)",
            labels=["function", "outcome"],
        )
        if self.runner is not None:
            for (fn, outcome), n in sorted(self.runner.outcomes.items()):
                outcomes.add_metric([fn, outcome], n)
        yield outcomes
        ticks = CounterMetricFamily(
            "hourai_schedule_ticks", "scheduled events queued", labels=["function"]
        )
        for fn, n in sorted(self.ticks.items()):
            ticks.add_metric([fn], n)
        yield ticks
        trig = CounterMetricFamily(
            "hourai_trigger_events",
            "queue trigger batches and records by outcome",
            labels=["function", "outcome"],
        )
        for fn, (_, consumer, _) in sorted(self.triggers.items()):
            for outcome, n in sorted(consumer.counts.items()):
                trig.add_metric([fn, outcome], n)
        yield trig


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _next(schedule: Schedule, last: datetime) -> datetime | None:
    return (
        schedule.next_after(last, last) if isinstance(schedule, Rate) else schedule.next_after(last)
    )


def schedule_first(schedule: Schedule, last: datetime) -> datetime:
    return _next(schedule, last) or last


def _make_consumer(
    name: str, trigger: dict[str, Any], invoke: InvokeEvent, config: AsyncConfig, capacity: int
) -> BatchConsumer:
    return BatchConsumer(
        name,
        make_source(name, trigger),
        invoke,
        batch_size=trigger["batch_size"],
        batch_window=trigger["batch_window"],
        concurrency=min(trigger.get("concurrency") or config.concurrency, capacity),
        max_deliveries=trigger["max_deliveries"],
        timeout=config.timeout,
    )
