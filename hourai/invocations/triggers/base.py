"""What every queue trigger shares: batching, back-pressure, partial batch failure.

A :class:`Source` is one queue's client (Redis streams here; Kafka would be another): it
fetches messages for this consumer — new ones, and ones delivered before whose handling
never finished — acknowledges, and sets aside messages that failed too often. The
:class:`BatchConsumer` around it is the same for every queue:

- **batches**: up to ``batch_size`` messages, or what arrived within ``batch_window``
  seconds of the first, become one event ``{"Records": [...]}`` (Lambda's SQS shape);
- **back-pressure**: a batch is fetched only when one of ``concurrency`` slots is free, so
  no more is taken off the queue than the function can run; the rest stays in the queue;
- **partial failure**: a successful answer may hold ``{"batchItemFailures":
  [{"itemIdentifier": ID}]}`` (Lambda's ReportBatchItemFailures): those are not
  acknowledged and come back later; a failed invocation acknowledges nothing;
- **dead letters**: a message delivered ``max_deliveries`` times without success goes to
  the source's dead-letter place instead of to the function again;
- **traces**: a batch's invocation links to the trace context each of its messages carries
  (:attr:`Message.traceparent`, as its producer put it), the messaging conventions' consumer
  "process" span with a link per message's creation context.

Consumers run in the daemon, decoupled from instances: workers never see the queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from hourai.invocations.runner import Delivery, InvokeEvent, Outcome

log = logging.getLogger("hourai.triggers")

FETCH_WAIT = 1.0  # longest single wait for the first message of a batch
ERROR_BACKOFF = (0.5, 10.0)  # a broken connection is retried after this, doubling to that


@dataclass(frozen=True)
class Message:
    id: str  # the source's own id (a stream entry id; for Kafka topic/partition@offset)
    fields: dict[str, str]
    deliveries: int  # 1 for a first delivery
    sent_ms: int = 0  # when it was enqueued, if the source knows
    extra: dict[str, Any] = field(default_factory=dict)
    traceparent: str | None = None  # the producer's W3C trace context, if it sent one


class Source(Protocol):
    """One queue, seen by one consumer of a group."""

    description: str  # for logs and each record's eventSourceARN
    system: str  # messaging.system of its traces ("redis")
    destination: str  # messaging.destination.name (the stream, the topic)

    async def connect(self) -> None: ...
    async def fetch(self, count: int, wait: float) -> list[Message]: ...
    async def ack(self, ids: list[str]) -> None: ...
    async def dead_letter(self, message: Message, reason: str) -> None: ...
    async def close(self) -> None: ...
    def record(self, message: Message) -> dict[str, Any]: ...


def failed_items(outcome: Outcome, ids: list[str]) -> set[str] | None:
    """The ids a successful answer reports as failed (None: the answer is malformed, so
    the whole batch counts as failed, as Lambda treats it)."""
    try:
        doc = json.loads(outcome.payload) if outcome.payload.strip() else {}
    except ValueError:
        return set()  # not JSON: no report, the batch succeeded
    if not isinstance(doc, dict) or "batchItemFailures" not in doc:
        return set()
    items = doc["batchItemFailures"]
    if not isinstance(items, list):
        return None
    out = set()
    known = set(ids)
    for item in items:
        ident = item.get("itemIdentifier") if isinstance(item, dict) else None
        if not isinstance(ident, str) or ident not in known:
            return None
        out.add(ident)
    return out


class BatchConsumer:
    def __init__(
        self,
        function: str,
        source: Source,
        invoke: InvokeEvent,
        *,
        batch_size: int = 10,
        batch_window: float = 0.5,
        concurrency: int = 1,
        max_deliveries: int = 3,
        timeout: float | None = None,
    ) -> None:
        self.function = function
        self.source = source
        self.invoke = invoke
        self.batch_size = batch_size
        self.batch_window = batch_window
        self.concurrency = concurrency
        self.max_deliveries = max_deliveries
        self.timeout = timeout
        self.inflight = 0
        self.counts: Counter[str] = Counter()  # batches ok/failed/partial; records acked, ...
        self.error: str | None = None  # the last connection problem, until it heals
        self._tasks: set[asyncio.Task[None]] = set()

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source.description,
            "batch_size": self.batch_size,
            "batch_window": self.batch_window,
            "concurrency": self.concurrency,
            "inflight": self.inflight,
            "counts": dict(self.counts),
            "error": self.error,
        }

    async def run(self) -> None:
        """Fetch, invoke, ack until cancelled."""
        slots = asyncio.Semaphore(self.concurrency)
        backoff = ERROR_BACKOFF[0]
        try:
            while True:
                try:
                    await self.source.connect()
                    while True:
                        await slots.acquire()  # back-pressure: fetch only what can run
                        try:
                            batch = await self._collect()
                            _raise_if_cancelled()
                        except BaseException:
                            slots.release()
                            raise
                        if not batch:
                            slots.release()
                            continue
                        self.error = None
                        backoff = ERROR_BACKOFF[0]
                        task = asyncio.get_running_loop().create_task(self._deliver(batch))
                        self._tasks.add(task)
                        task.add_done_callback(lambda t: (self._tasks.discard(t), slots.release()))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    _raise_if_cancelled()
                    if self.error != str(exc):
                        log.error("%s: trigger %s: %s", self.function, self.source.description, exc)
                    self.error = str(exc)
                    self.counts["connection_errors"] += 1
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, ERROR_BACKOFF[1])
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.source.close()

    def _delivery(self, batch: list[Message]) -> Delivery:
        attributes: dict[str, str | int] = {
            "faas.trigger": "pubsub",
            "messaging.system": self.source.system,
            "messaging.operation.type": "process",
            "messaging.destination.name": self.source.destination,
            "messaging.batch.message_count": len(batch),
        }
        if len(batch) == 1:
            attributes["messaging.message.id"] = batch[0].id
        links = tuple(dict.fromkeys(m.traceparent for m in batch if m.traceparent))
        return Delivery(attributes, links)

    async def _collect(self) -> list[Message]:
        loop = asyncio.get_running_loop()
        batch = await self.source.fetch(self.batch_size, FETCH_WAIT)
        if not batch:
            return []
        deadline = loop.time() + self.batch_window
        while len(batch) < self.batch_size:
            left = deadline - loop.time()
            if left <= 0:
                break
            batch += await self.source.fetch(self.batch_size - len(batch), left)
        return batch

    async def _deliver(self, batch: list[Message]) -> None:
        self.inflight += 1
        try:
            live = []
            for m in batch:
                if m.deliveries > self.max_deliveries:
                    await self.source.dead_letter(
                        m, f"not handled after {self.max_deliveries} deliveries"
                    )
                    self.counts["dead_lettered"] += 1
                    log.warning(
                        "%s: message %s of %s dead-lettered after %d deliveries",
                        self.function,
                        m.id,
                        self.source.description,
                        self.max_deliveries,
                    )
                else:
                    live.append(m)
            if not live:
                return
            event = json.dumps({"Records": [self.source.record(m) for m in live]}).encode()
            outcome = await self.invoke(self.function, event, self.timeout, self._delivery(live))
            ids = [m.id for m in live]
            if not outcome.ok:
                self.counts["batches_failed"] += 1
                log.info(
                    "%s: batch of %d from %s failed (redelivered later): %s",
                    self.function,
                    len(live),
                    self.source.description,
                    outcome.error or outcome.status,
                )
                return
            failed = failed_items(outcome, ids)
            if failed is None:
                self.counts["batches_failed"] += 1
                log.warning(
                    "%s: its batchItemFailures is malformed or names unknown ids: the whole "
                    "batch counts as failed",
                    self.function,
                )
                return
            done = [i for i in ids if i not in failed]
            if done:
                await self.source.ack(done)
            self.counts["records_acked"] += len(done)
            self.counts["records_failed"] += len(failed)
            self.counts["batches_partial" if failed else "batches_ok"] += 1
        finally:
            self.inflight -= 1


def _raise_if_cancelled() -> None:
    """A cancel the client library swallowed still stops the consumer: redis-py can turn a
    cancel that lands during a blocking read into a timeout error (or a result), and the
    loop would run on, unstoppable, keeping the daemon's shutdown waiting for ever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
