"""The Redis stream trigger against a real redis-server: batches, partial failures,
redelivery after the visibility timeout, dead letters, back-pressure; then in a daemon."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import FUNCTIONS, wait_until
from redis_server import needs_redis, redis_url  # noqa: F401 (a fixture)

from hourai.client import Client
from hourai.invocations.runner import Outcome
from hourai.invocations.triggers import parse_trigger
from hourai.invocations.triggers.base import BatchConsumer
from hourai.invocations.triggers.redis_stream import RedisStreamSource

pytestmark = needs_redis


def _consumer(url: str, invoke: Any, **kw: Any) -> BatchConsumer:
    trigger = parse_trigger(
        {
            "type": "redis-stream",
            "url": url,
            "stream": "orders",
            "visibility_timeout": kw.pop("visibility_timeout", 0.3),
            **kw.pop("trigger", {}),
        }
    )
    return BatchConsumer(
        "fn",
        RedisStreamSource("fn", trigger),
        invoke,
        batch_size=trigger["batch_size"],
        batch_window=trigger["batch_window"],
        max_deliveries=trigger["max_deliveries"],
        **kw,
    )


async def _until(pred: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def _stopped(task: asyncio.Task[Any]) -> None:
    """Cancel a consumer; it must end, not run on (the daemon's shutdown waits for it)."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done, "the consumer did not stop when cancelled"


def test_batches_partial_failure_redelivery_dead_letter(redis_url: str) -> None:  # noqa: F811
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    for i in range(25):
        r.xadd("orders", {"body": json.dumps({"n": i, "poison": i == 7})})
    batches: list[list[dict[str, Any]]] = []

    async def invoke(name: str, event: bytes, timeout: float | None, *_: Any) -> Outcome:
        records = json.loads(event)["Records"]
        batches.append(records)
        failed = [
            {"itemIdentifier": rec["messageId"]}
            for rec in records
            if json.loads(rec["body"])["poison"]
        ]
        return Outcome(200, json.dumps({"batchItemFailures": failed}).encode())

    async def main() -> BatchConsumer:
        c = _consumer(redis_url, invoke, trigger={"batch_size": 10, "max_deliveries": 3})
        task = asyncio.create_task(c.run())
        await _until(lambda: r.xlen("orders:dead") == 1)
        await _until(lambda: r.xpending("orders", "hourai")["pending"] == 0)
        await _stopped(task)
        return c

    c = asyncio.run(main())
    assert max(len(b) for b in batches) == 10  # batched up to batch_size
    seen = [json.loads(rec["body"])["n"] for b in batches for rec in b]
    assert sorted(set(seen)) == list(range(25))
    assert seen.count(7) == 3  # delivered max_deliveries times, then set aside
    poison = [rec for b in batches for rec in b if json.loads(rec["body"])["n"] == 7]
    assert [p["attributes"]["ApproximateReceiveCount"] for p in poison] == ["1", "2", "3"]
    first = batches[0][0]
    assert set(first) >= {"messageId", "body", "attributes", "eventSource", "eventSourceARN"}
    assert first["eventSource"] == "hourai:redis-stream"
    (dead,) = r.xrange("orders:dead")
    assert dead[1]["hourai-reason"].startswith("not handled after 3")
    assert json.loads(dead[1]["body"])["n"] == 7
    assert c.counts["records_acked"] == 24 and c.counts["dead_lettered"] == 1


def test_a_failed_invocation_acks_nothing_and_comes_back(redis_url: str) -> None:  # noqa: F811
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.xadd("orders", {"a": "1", "b": "2"})
    calls: list[dict[str, Any]] = []

    async def invoke(name: str, event: bytes, timeout: float | None, *_: Any) -> Outcome:
        calls.append(json.loads(event))
        if len(calls) == 1:
            return Outcome(502, b"", "worker died")
        return Outcome(200, b"ok")

    async def main() -> None:
        task = asyncio.create_task(_consumer(redis_url, invoke).run())
        await _until(lambda: len(calls) == 2)
        await _until(lambda: r.xpending("orders", "hourai")["pending"] == 0)
        await _stopped(task)

    asyncio.run(main())
    # several fields: the body is them as JSON; the second delivery says so
    assert json.loads(calls[0]["Records"][0]["body"]) == {"a": "1", "b": "2"}
    assert calls[1]["Records"][0]["attributes"]["ApproximateReceiveCount"] == "2"


def test_back_pressure_no_more_in_flight_than_allowed(redis_url: str) -> None:  # noqa: F811
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    for i in range(40):
        r.xadd("orders", {"body": str(i)})
    running = 0
    peak = 0
    done = 0

    async def invoke(name: str, event: bytes, timeout: float | None, *_: Any) -> Outcome:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        done += len(json.loads(event)["Records"])
        return Outcome(200, b"{}")

    async def main() -> int:
        c = _consumer(
            redis_url, invoke, concurrency=2, trigger={"batch_size": 2, "batch_window": 0.0}
        )
        task = asyncio.create_task(c.run())
        await asyncio.sleep(0.08)
        # what is not in flight stays in Redis, unread by us
        unread = r.xinfo_groups("orders")[0]["lag"]
        await _until(lambda: done == 40)
        await _stopped(task)
        return int(unread or 0)

    unread = asyncio.run(main())
    assert peak == 2
    assert unread >= 40 - 2 * 2 * 3, unread  # a few batches at most were taken


def test_batch_window_gathers_what_arrives(redis_url: str) -> None:  # noqa: F811
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    sizes: list[int] = []

    async def invoke(name: str, event: bytes, timeout: float | None, *_: Any) -> Outcome:
        sizes.append(len(json.loads(event)["Records"]))
        return Outcome(200, b"{}")

    async def main() -> None:
        c = _consumer(redis_url, invoke, trigger={"batch_size": 100, "batch_window": 0.5})
        task = asyncio.create_task(c.run())
        await asyncio.sleep(0.3)
        for i in range(5):  # trickling in, 50 ms apart
            r.xadd("orders", {"body": str(i)})
            await asyncio.sleep(0.05)
        await _until(lambda: sum(sizes) == 5)
        await _stopped(task)

    asyncio.run(main())
    assert sizes == [5]


def test_a_consumer_cancelled_at_any_moment_stops(redis_url: str) -> None:  # noqa: F811
    """redis-py can swallow a cancel that lands during a blocking read (redis-py#2028): the
    consumer stops anyway, wherever its fetch was (a few in a hundred hung before)."""

    async def invoke(*_: Any) -> Outcome:
        return Outcome(200, b"{}")

    async def main() -> None:
        rng = random.Random(2028)
        for _ in range(40):
            task = asyncio.create_task(_consumer(redis_url, invoke).run())
            await asyncio.sleep(rng.random() * 0.03)
            await _stopped(task)

    asyncio.run(main())


def test_trigger_options_are_checked() -> None:
    with pytest.raises(ValueError, match="stream is required"):
        parse_trigger({"type": "redis-stream", "url": "redis://127.0.0.1:1/0"})
    with pytest.raises(ValueError, match="type must be one of"):
        parse_trigger({"type": "kafka", "url": "x", "stream": "y"})
    with pytest.raises(ValueError, match="unknown key"):
        parse_trigger({"type": "redis-stream", "url": "redis://h", "stream": "s", "topic": 1})


def test_a_function_consumes_a_stream_in_the_daemon(
    hourai_daemon,
    tmp_path: Path,
    redis_url: str,  # noqa: F811
) -> None:
    where = tmp_path / "consumer"
    shutil.copytree(FUNCTIONS / "asyncjob", where)
    (where / "hourai.toml").write_text(
        'entry = "handler"\n'
        f'trigger = {{type = "redis-stream", url = "{redis_url}", stream = "orders", '
        "batch_size = 5, batch_window = 0.2, visibility_timeout = 0.5, max_deliveries = 2}\n"
    )
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    for i in range(12):
        r.xadd("orders", {"body": "fail" if i == 3 else f"order-{i}"})
    d = hourai_daemon("[defaults]\nspares = 0\n")
    d.cli("deploy", "consumer", str(where))
    wait_until(lambda: r.xlen("orders:dead") == 1, timeout=30)
    wait_until(lambda: r.xpending("orders", "hourai")["pending"] == 0, timeout=30)
    assert r.xrange("orders:dead")[0][1]["body"] == "fail"
    shown = Client(d.socket).show("consumer")
    assert shown["trigger"]["counts"]["records_acked"] == 11
    assert "trigger: redis-stream orders" in d.cli("show", "consumer").stdout
    assert 'hourai_trigger_events_total{function="consumer",outcome="records_acked"} 11.0' in (
        Client(d.socket).metrics()
    )


def test_entries_in_flight_at_a_kill_9_are_delivered_after_the_restart(
    hourai_daemon,
    tmp_path: Path,
    redis_url: str,  # noqa: F811
) -> None:
    import signal

    where = tmp_path / "slow"
    shutil.copytree(FUNCTIONS / "asyncjob", where)
    (where / "hourai.toml").write_text(
        'entry = "handler"\n'
        f'trigger = {{type = "redis-stream", url = "{redis_url}", stream = "orders", '
        "batch_size = 2, batch_window = 0.0, visibility_timeout = 1.0}\n"
    )
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    for i in range(6):
        r.xadd("orders", {"body": json.dumps({"sleep": 0.4, "i": i})})
    d = hourai_daemon("[defaults]\nspares = 0\n")
    d.cli("deploy", "slow", str(where))
    wait_until(lambda: r.xpending("orders", "hourai")["pending"] > 0, timeout=30)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    assert r.xpending("orders", "hourai")["pending"] > 0  # taken, not acknowledged

    hourai_daemon("[defaults]\nspares = 0\n")  # same state dir: the function comes back

    def drained() -> bool:
        group = r.xinfo_groups("orders")[0]
        return group["pending"] == 0 and group["lag"] == 0

    wait_until(drained, timeout=60)
    assert r.xlen("orders:dead") == 0
