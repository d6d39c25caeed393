"""The asyncio side of asynchronous invocations: the store's thread, and the consumer that
feeds queued events to the scheduler.

The runner knows the runtime through one async callable, :class:`InvokeEvent`: invoke a
function with an event and say how it went. Nothing here knows HTTP or workers.

Traces (with tracing on, see hourai.tracing): each attempt is a trace of its own, whose root
is a CONSUMER span ``process <function>`` with a *link* to the context stored with the event
(the accepting request's ``publish`` span), as OpenTelemetry's messaging conventions have a
consumer's "process" span link to the message's creation context. Not a child of it: the
attempt may run hours later, and again on a retry; one trace per attempt keeps each one's
spans together, where children would stretch the accepting request's trace over hours and
every retry. The :class:`Delivery` handed to ``InvokeEvent`` carries the link and the
span's attributes.

SQLite runs in one thread of its own (:class:`AsyncStore`), not on the event loop: every
transition is a commit, and a commit with ``synchronous=FULL`` is an fsync of the WAL,
which takes from tens of microseconds (tmpfs) to tens of milliseconds (a busy disk) — the
loop serves every other request meanwhile. Accepts that arrive together share one commit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from hourai.invocations.queue import DEAD, Accept, Invocation, InvocationQueue

log = logging.getLogger("hourai.invocations")

T = TypeVar("T")

POLL_INTERVAL = 1.0  # the runner looks for due events at least this often
THROTTLE_DELAY = 1.0  # a throttled event (no room in the function) is tried again after this


@dataclass(frozen=True)
class Outcome:
    """How one invocation went. ``error`` None is success; ``throttled`` means the function
    had no room (rate limit, full queue): nothing ran, and it does not count as an attempt."""

    status: int
    payload: bytes
    error: str | None = None
    throttled: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.throttled


@dataclass(frozen=True)
class Delivery:
    """What an invocation delivers, for its trace: the root span is the CONSUMER span
    ``process <function>`` with ``attributes`` (messaging.*, faas.trigger) and a link to
    each of ``links``, the traceparents of what produced the event (none: a new trace with
    no link, as a scheduled tick's)."""

    attributes: Mapping[str, str | int]
    links: tuple[str, ...] = ()


class InvokeEvent(Protocol):
    """The seam into the runtime: run ``name`` with ``event`` (JSON bytes), with its own
    ``timeout`` (None: the function's); ``delivery`` places its trace."""

    async def __call__(
        self, name: str, event: bytes, timeout: float | None, delivery: Delivery | None = None
    ) -> Outcome: ...


@dataclass(frozen=True)
class AsyncConfig:
    """A function's asynchronous invocation settings (Lambda's names in brackets)."""

    retries: int = 2  # [MaximumRetryAttempts]
    max_age: float = 21600.0  # [MaximumEventAgeInSeconds]
    retry_delay: float = 60.0  # first retry after this, doubling (Lambda: about 1, then 2 min)
    concurrency: int = 1  # async invocations in flight at most, below the function's capacity
    timeout: float | None = None  # None: the function's own timeout
    on_success: str | None = None  # [DestinationConfig.OnSuccess]: a function
    on_failure: str | None = None  # [DestinationConfig.OnFailure]: a function

    def accept(
        self, function: str, event: bytes, source: str, traceparent: str | None = None
    ) -> Accept:
        return Accept(
            function, event, source, self.retries + 1, self.max_age, traceparent=traceparent
        )


class AsyncStore:
    """The queue behind one thread, off the event loop. Calls that arrive while the thread
    is busy are run together in one transaction when it is free (group commit): one fsync
    for many transitions, so a busy queue costs fewer syncs per event, not more."""

    def __init__(self, queue: InvocationQueue) -> None:
        self.queue = queue
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hourai-queue")
        self._calls: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the store's thread, within a shared transaction. The commit is
        a task of its own: a caller that goes away strands nobody else."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._calls.append((lambda: fn(*args), future))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._calls:
            batch, self._calls = self._calls, []
            try:
                results = await loop.run_in_executor(self._pool, self._run, batch)
            except Exception as exc:  # nothing of the batch was committed
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)
                continue
            for (_, f), result in zip(batch, results, strict=True):
                if not f.done():
                    f.set_result(result)

    def _run(self, batch: list[tuple[Callable[[], Any], asyncio.Future[Any]]]) -> list[Any]:
        with self.queue.transaction():
            return [fn() for fn, _ in batch]

    async def accept(self, item: Accept) -> str:
        """Durably store one event; returns its id once committed."""
        ids = await self.call(self.queue.accept_many, [item], time.time())
        return ids[0]

    def close(self) -> None:
        self._pool.submit(self.queue.close)
        self._pool.shutdown(wait=True)


def destination_record(
    inv: Invocation, outcome: Outcome | None, condition: str, error: str | None = None
) -> bytes:
    """Lambda's destination record: what an on-success / on-failure function receives."""
    response: dict[str, Any] = {
        "statusCode": outcome.status if outcome else None,
        "executedVersion": "$LATEST",
    }
    if condition != "Success":
        response["functionError"] = "Unhandled"
    payload: Any = None
    if outcome is not None and outcome.payload:
        payload = _json_or_text(outcome.payload)
    elif error:
        payload = {"errorMessage": error, "errorType": "Error"}
    doc = {
        "version": "1.0",
        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "requestContext": {
            "requestId": inv.id,
            "functionArn": f"arn:hourai:lambda:local:0:function:{inv.function}",
            "condition": condition,
            "approximateInvokeCount": inv.attempt,
        },
        "requestPayload": _json_or_text(inv.event),
        "responseContext": response,
        "responsePayload": payload,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def delivery(inv: Invocation) -> Delivery:
    """One attempt at a queued event, for its trace (every attempt links to the same
    accepting span)."""
    return Delivery(
        {
            "faas.trigger": "timer" if inv.source == "schedule" else "pubsub",
            "messaging.system": "hourai",
            "messaging.operation.type": "process",
            "messaging.destination.name": inv.function,
            "messaging.message.id": inv.id,
            "hourai.source": inv.source,
            "hourai.attempt": inv.attempt,
        },
        (inv.traceparent,) if inv.traceparent else (),
    )


def _json_or_text(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace")


class Runner:
    """Claims due events of the functions it is told about, at most ``concurrency`` in
    flight per function, and records how each attempt went."""

    def __init__(self, store: AsyncStore, invoke: InvokeEvent) -> None:
        self.store = store
        self.invoke = invoke
        self.configs: dict[str, AsyncConfig] = {}
        self.inflight: dict[str, int] = {}
        self.outcomes: dict[tuple[str, str], int] = {}  # (function, outcome) -> count
        self._held: dict[str, tuple[str, int]] = {}  # id -> (function, attempt)
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self.claiming = True

    def configure(self, name: str, config: AsyncConfig) -> None:
        self.configs[name] = config
        self.wake()

    def forget(self, name: str) -> None:
        self.configs.pop(name, None)

    def wake(self) -> None:
        self._wake.set()

    def _count(self, function: str, outcome: str) -> None:
        key = (function, outcome)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1

    async def run(self) -> None:
        while True:
            self._wake.clear()
            if self.claiming:
                await self._pump()
            ready = [n for n, c in self.configs.items() if self.inflight.get(n, 0) < c.concurrency]
            due = await self.store.call(self.store.queue.next_due, ready) if ready else None
            wait = POLL_INTERVAL if due is None else min(max(due - time.time(), 0.0), POLL_INTERVAL)
            if wait > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except TimeoutError:
                    pass

    async def _pump(self) -> None:
        for name, config in list(self.configs.items()):
            room = config.concurrency - self.inflight.get(name, 0)
            if room <= 0:
                continue
            for inv in await self.store.call(self.store.queue.expire, name, time.time()):
                self._count(name, "expired")
                log.warning(
                    "%s: async invocation %s is older than its maximum age: dead letter",
                    name,
                    inv.id,
                )
                if config.on_failure:
                    await self._destination(config.on_failure, inv, None, "EventAgeExceeded")
            claimed = await self.store.call(self.store.queue.claim, name, time.time(), room)
            for inv in claimed:
                if not self.claiming:  # stopping: hand it back at once
                    await self.store.call(
                        self.store.queue.release,
                        inv.id,
                        inv.attempt,
                        time.time(),
                        0.0,
                        "the daemon stopped before it ran",
                    )
                    continue
                self.inflight[name] = self.inflight.get(name, 0) + 1
                self._held[inv.id] = (name, inv.attempt)
                task = asyncio.get_running_loop().create_task(self._attempt(inv, config))
                self._tasks.add(task)
                task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("async invocation failed", exc_info=task.exception())

    async def _attempt(self, inv: Invocation, config: AsyncConfig) -> None:
        queue = self.store.queue
        try:
            try:
                outcome = await self.invoke(inv.function, inv.event, config.timeout, delivery(inv))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug on our side must not lose the event
                log.exception("%s: async invocation %s", inv.function, inv.id)
                outcome = Outcome(500, b"", f"hourai could not invoke it: {exc}")
            now = time.time()
            if outcome.throttled:
                self._count(inv.function, "throttled")
                await self.store.call(
                    queue.release,
                    inv.id,
                    inv.attempt,
                    now,
                    THROTTLE_DELAY,
                    f"throttled: {outcome.error or outcome.status}",
                )
            elif outcome.ok:
                done = await self.store.call(
                    queue.succeed, inv.id, inv.attempt, now, outcome.status, outcome.payload
                )
                if done:
                    self._count(inv.function, "succeeded")
                    if config.on_success:
                        await self._destination(config.on_success, inv, outcome, "Success")
            else:
                delay = config.retry_delay * 2 ** (inv.attempt - 1)
                status = await self.store.call(
                    lambda: queue.fail(
                        inv.id,
                        inv.attempt,
                        now,
                        outcome.error or f"status {outcome.status}",
                        status_code=outcome.status,
                        result=outcome.payload or None,
                        retry_delay=delay,
                    )
                )
                if status == DEAD:
                    self._count(inv.function, "dead_lettered")
                    final = await self.store.call(queue.get, inv.id)
                    log.warning(
                        "%s: async invocation %s dead-lettered after %d attempts: %s",
                        inv.function,
                        inv.id,
                        inv.attempt,
                        outcome.error,
                    )
                    if config.on_failure and final is not None:
                        await self._destination(
                            config.on_failure, final, outcome, final.condition or "RetriesExhausted"
                        )
                elif status is not None:
                    self._count(inv.function, "retried")
                    log.info(
                        "%s: async invocation %s failed (attempt %d), retry in %gs: %s",
                        inv.function,
                        inv.id,
                        inv.attempt,
                        delay,
                        outcome.error,
                    )
        finally:
            self._held.pop(inv.id, None)
            self.inflight[inv.function] = self.inflight.get(inv.function, 1) - 1
            self.wake()

    async def _destination(
        self, target: str, inv: Invocation, outcome: Outcome | None, condition: str
    ) -> None:
        record = destination_record(inv, outcome, condition, outcome.error if outcome else None)
        config = self.configs.get(target, AsyncConfig())
        # The record's run links to what accepted the event it reports on.
        item = config.accept(target, record, f"destination:{inv.id}", inv.traceparent)
        iid = await self.store.accept(item)
        log.info("%s: %s of %s sent to %s as %s", inv.function, condition, inv.id, target, iid)
        self.wake()

    async def stop(self) -> None:
        """Claim nothing more; cancel what runs and hand it back uncounted (the daemon let
        in-flight requests drain before this)."""
        self.claiming = False
        tasks = list(self._tasks)
        held = dict(self._held)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        now = time.time()
        for iid, (_fn, attempt) in held.items():
            await self.store.call(
                self.store.queue.release, iid, attempt, now, 0.0, "the daemon stopped while it ran"
            )
