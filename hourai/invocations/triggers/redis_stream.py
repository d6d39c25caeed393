"""A Redis stream as a queue trigger: one consumer of a consumer group, in the daemon.

- New entries come from ``XREADGROUP ... >``; each is pending for this consumer until
  ``XACK``, which the batch consumer sends only for what the function handled.
- What was delivered and not acknowledged (the function failed, reported it in
  ``batchItemFailures``, or the daemon died mid-batch) is taken back with ``XAUTOCLAIM``
  once it has been idle for ``visibility_timeout`` seconds — SQS's visibility timeout — and
  delivered again; ``XPENDING`` says how often it was delivered.
- Past ``max_deliveries`` it is copied to the dead-letter stream (``<stream>:dead`` by
  default, with its original id, the reason and the count) and acknowledged.
- The group is created if missing (``start = "earliest"``: from the stream's beginning, so
  what was queued before the first deploy is consumed; ``"latest"``: new entries only).
- An entry's ``traceparent`` field, if it has one, is the producer's trace context: the
  batch's invocation links to it (the field stays in the record, as every field does).
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from hourai.invocations.triggers.base import Message

# Pending entries are looked for at most this often (each look is an XAUTOCLAIM round trip).
RECLAIM_INTERVAL = 0.5


def _s(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class RedisStreamSource:
    def __init__(self, function: str, config: dict[str, Any]) -> None:
        self.function = function
        self.url = config["url"]
        self.stream = config["stream"]
        self.group = config["group"]
        self.dead_stream = config["dead_letter"]
        self.start = "0" if config["start"] == "earliest" else "$"
        self.visibility_ms = int(config["visibility_timeout"] * 1000)
        # One consumer per function and host: a restart picks up its own pending entries.
        self.consumer = f"hourai-{socket.gethostname()}-{function}"
        self.description = f"redis-stream {self.stream} (group {self.group})"
        self.system = "redis"
        self.destination = self.stream
        self.redis: aioredis.Redis | None = None
        self._cursor = "0-0"
        self._reclaimed_at = 0.0

    async def connect(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
        self.redis = aioredis.from_url(self.url, socket_connect_timeout=5)
        try:
            await self.redis.xgroup_create(self.stream, self.group, id=self.start, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None

    async def fetch(self, count: int, wait: float) -> list[Message]:
        assert self.redis is not None
        now = time.monotonic()
        if now - self._reclaimed_at >= RECLAIM_INTERVAL:
            self._reclaimed_at = now
            again = await self._reclaim(count)
            if again:
                return again
        block = max(1, int(wait * 1000))  # 0 would block for ever
        reply = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=count, block=block
        )
        out = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                out.append(self._message(entry_id, fields, 1))
        return out

    async def _reclaim(self, count: int) -> list[Message]:
        assert self.redis is not None
        reply = await self.redis.xautoclaim(
            self.stream, self.group, self.consumer, self.visibility_ms, self._cursor, count=count
        )
        self._cursor = _s(reply[0])
        entries = [(i, f) for i, f in reply[1] if f is not None]  # None: trimmed meanwhile
        if not entries:
            return []
        ids = [_s(i) for i, _ in entries]
        pending = await self.redis.xpending_range(
            self.stream,
            self.group,
            min=min(ids, key=_order),
            max=max(ids, key=_order),
            count=len(ids) * 4 + 10,
            consumername=self.consumer,
        )
        times = {_s(p["message_id"]): int(p["times_delivered"]) for p in pending}
        return [self._message(i, f, times.get(_s(i), 2)) for i, f in entries]

    def _message(self, entry_id: Any, fields: dict[Any, Any], deliveries: int) -> Message:
        ident = _s(entry_id)
        decoded = {_s(k): _s(v) for k, v in fields.items()}
        return Message(
            id=ident,
            fields=decoded,
            deliveries=deliveries,
            sent_ms=int(ident.split("-", 1)[0]),
            traceparent=decoded.get("traceparent"),
        )

    async def ack(self, ids: list[str]) -> None:
        assert self.redis is not None
        await self.redis.xack(self.stream, self.group, *ids)

    async def dead_letter(self, message: Message, reason: str) -> None:
        assert self.redis is not None
        fields = {
            **message.fields,
            "hourai-source-id": message.id,
            "hourai-source-stream": self.stream,
            "hourai-function": self.function,
            "hourai-reason": reason,
            "hourai-deliveries": str(message.deliveries - 1),
        }
        # One round trip, both or neither: a crash between them would otherwise leave the
        # entry pending (dead-lettered twice later) or acknowledged and nowhere.
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dead_stream, fields)
            pipe.xack(self.stream, self.group, message.id)
            await pipe.execute()

    def record(self, message: Message) -> dict[str, Any]:
        """One entry in Lambda's SQS record shape: ``body`` is the ``body`` field when the
        entry has just that one, else the fields as a JSON object."""
        fields = message.fields
        body = fields["body"] if set(fields) == {"body"} else json.dumps(fields)
        return {
            "messageId": message.id,
            "receiptHandle": message.id,
            "body": body,
            "attributes": {
                "ApproximateReceiveCount": str(message.deliveries),
                "SentTimestamp": str(message.sent_ms),
            },
            "messageAttributes": {
                k: {"stringValue": v, "dataType": "String"} for k, v in fields.items()
            },
            "eventSource": "hourai:redis-stream",
            "eventSourceARN": f"{_redacted(self.url)}/{self.stream}",
            "awsRegion": "local",
        }


def _order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _redacted(url: str) -> str:
    """The url without a password: records reach tenant code and logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"
