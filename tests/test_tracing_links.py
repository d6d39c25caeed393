"""Traces of what runs later, for real over OTLP/HTTP: an async invocation's attempts (each a
trace of its own, retries too) link to the span of the request that queued it, by every way
in (HTTP header, Lambda's InvocationType=Event, `hourai invoke --async`); a scheduled run
starts a trace with no link; a Redis stream entry's traceparent is linked from its batch."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import FUNCTIONS, request, wait_until
from otlp_receiver import CONSUMER, ERROR, PRODUCER, SERVER, Receiver, Span, children, one
from redis_server import needs_redis, redis_url  # noqa: F401 (a fixture)

from hourai.client import Client
from hourai.tracing import format_traceparent

CALLER_SPAN = 0xB7AD6B7169203331


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def _daemon(hourai_daemon: Any, receiver: Receiver, top: str = "") -> Any:
    return hourai_daemon(
        top + "[defaults]\nspares = 0\n"
        f"[tracing]\nenabled = true\nendpoint = 'http://127.0.0.1:{receiver.port}/v1/traces'\n"
    )


def _job(tmp: Path, name: str, toml: str = "") -> str:
    where = tmp / name
    shutil.copytree(FUNCTIONS / "asyncjob", where)
    (where / "hourai.toml").write_text('entry = "handler"\nasync_retry_delay = 0.1\n' + toml)
    return str(where)


def _caller(n: int) -> tuple[str, str]:
    """A caller's traceparent, and its trace id."""
    trace_id = 0x0AF7651916CD43DD8448EB211C800000 + n
    return format_traceparent(trace_id, CALLER_SPAN, 1), f"{trace_id:032x}"


def _runs(receiver: Receiver, function: str, iid: str) -> list[Span]:
    """The root spans of the attempts at one async invocation, by attempt."""
    found = [
        s
        for s in receiver.named(f"process {function}")
        if s.attributes.get("messaging.message.id") == iid
    ]
    return sorted(found, key=lambda s: s.attributes["hourai.attempt"])


def _accepted(receiver: Receiver, trace_id: str, function: str, over_http: bool) -> Span:
    """The accepting request's spans in the caller's trace; returns the publish span."""
    names = {f"publish {function}"} | ({f"POST {function}"} if over_http else set())
    wait_until(lambda: names <= {s.name for s in receiver.trace(trace_id)}, timeout=20)
    spans = receiver.trace(trace_id)
    publish = one(spans, f"publish {function}")
    assert publish.kind == PRODUCER
    assert publish.attributes["messaging.destination.name"] == function
    if over_http:
        server = one(spans, f"POST {function}")
        assert server.kind == SERVER and server.parent == f"{CALLER_SPAN:016x}"
        assert server.attributes["http.response.status_code"] == 202
        assert publish.parent == server.span_id
    else:
        assert publish.parent == f"{CALLER_SPAN:016x}"
    return publish


@pytest.mark.slow
def test_every_attempt_links_to_the_request_that_queued_it(
    hourai_daemon, receiver: Receiver, tmp_path: Path
) -> None:
    d = _daemon(hourai_daemon, receiver)
    d.cli("deploy", "job", _job(tmp_path, "job"))
    caller, trace_id = _caller(1)
    reply = request(
        d.port,
        "/job/",
        "POST",
        b'{"fail": "always"}',
        {"X-Amz-Invocation-Type": "Event", "traceparent": caller},
    )
    assert reply.status == 202, reply.body
    iid = reply.json()["invocationId"]  # type: ignore[index]
    publish = _accepted(receiver, trace_id, "job", over_http=True)
    assert publish.attributes["messaging.message.id"] == iid
    # the queue keeps the creation context: the publish span's
    doc = Client(d.socket).invocations("job", iid)
    assert doc["traceparent"] == f"00-{trace_id}-{publish.span_id}-01"
    shown = d.cli("invocations", "job", iid).stdout
    assert f"accepted in trace {trace_id} (span {publish.span_id})" in shown

    # three attempts (two retries), each a trace of its own linking back to the publish span
    wait_until(lambda: len(_runs(receiver, "job", iid)) == 3, timeout=60)
    runs = _runs(receiver, "job", iid)
    assert [r.attributes["hourai.attempt"] for r in runs] == [1, 2, 3]
    assert len({r.trace_id for r in runs} | {trace_id}) == 4
    for run in runs:
        assert run.kind == CONSUMER and run.parent == "" and run.status == ERROR
        assert run.links == [(trace_id, publish.span_id)]
        assert run.attributes["faas.trigger"] == "pubsub"
        assert run.attributes["messaging.operation.type"] == "process"
        assert run.attributes["hourai.source"] == "http"
        # under it, the same tree as a synchronous request's, the function's error marked
        wait_until(lambda r=run: "hourai.invoke" in {s.name for s in receiver.trace(r.trace_id)})
        spans = receiver.trace(run.trace_id)
        assert {s.name for s in children(spans, run)} == {"hourai.queue", "hourai.invoke"}
        invoke = one(spans, "hourai.invoke")
        assert invoke.status == ERROR and invoke.attributes["hourai.error_id"]
    # and nothing of the runs joined the caller's trace
    assert {s.name for s in receiver.trace(trace_id)} == {"POST job", "publish job"}


@pytest.mark.slow
def test_the_lambda_api_and_the_cli_link_their_async_invocations_too(
    hourai_daemon, receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = _daemon(hourai_daemon, receiver, 'lambda_listen = "127.0.0.1:0"\n')
    d.cli("deploy", "job", _job(tmp_path, "job"))
    lambda_port = int(d.wait_for(r"Lambda Invoke API at http://[\d.]+:(\d+)").group(1))

    # Lambda's Invoke API, InvocationType=Event, with the caller's traceparent
    caller, lambda_trace = _caller(2)
    reply = request(
        lambda_port,
        "/2015-03-31/functions/job/invocations",
        "POST",
        b'{"via": "lambda"}',
        {"X-Amz-Invocation-Type": "Event", "traceparent": caller},
    )
    assert reply.status == 202, reply.body
    lambda_id = reply.headers["x-amzn-requestid"]

    # hourai invoke --async: -H traceparent, and $TRACEPARENT (OpenTelemetry's env carrier)
    caller, header_trace = _caller(3)
    header_id = d.cli(
        "invoke", "job", "--async", "--data", '{"via": "-H"}', "-H", f"traceparent: {caller}"
    ).stdout.strip()
    caller, env_trace = _caller(4)
    monkeypatch.setenv("TRACEPARENT", caller)
    env_id = d.cli("invoke", "job", "--async", "--data", '{"via": "env"}').stdout.strip()
    monkeypatch.delenv("TRACEPARENT")
    untraced_id = d.cli("invoke", "job", "--async", "--data", "{}").stdout.strip()

    for trace_id, iid, over_http, source in (
        (lambda_trace, lambda_id, True, "lambda-api"),
        (header_trace, header_id, False, "api"),
        (env_trace, env_id, False, "api"),
    ):
        publish = _accepted(receiver, trace_id, "job", over_http)
        assert publish.attributes["messaging.message.id"] == iid
        wait_until(lambda i=iid: len(_runs(receiver, "job", i)) == 1, timeout=30)
        (run,) = _runs(receiver, "job", iid)
        assert run.links == [(trace_id, publish.span_id)] and run.status != ERROR
        assert run.attributes["hourai.source"] == source

    # without a caller's context the publish span starts a trace, and the run links to it
    wait_until(lambda: len(_runs(receiver, "job", untraced_id)) == 1, timeout=30)
    (run,) = _runs(receiver, "job", untraced_id)
    (publish,) = [
        s
        for s in receiver.named("publish job")
        if s.attributes.get("messaging.message.id") == untraced_id
    ]
    assert publish.parent == "" and run.links == [(publish.trace_id, publish.span_id)]

    # a traceparent that is none is refused, not stored
    bad = d.cli("invoke", "job", "--async", "--data", "{}", "-H", "traceparent: x", check=False)
    assert bad.returncode != 0 and "traceparent" in bad.stderr


@pytest.mark.slow
def test_a_scheduled_run_starts_a_trace_of_its_own(
    hourai_daemon, receiver: Receiver, tmp_path: Path
) -> None:
    d = _daemon(hourai_daemon, receiver)
    d.cli("deploy", "tick", _job(tmp_path, "tick", 'schedule = "rate(1 minute)"\n'))
    assert d.stop() == 0
    # as if the last tick was 90 s ago: the restarted daemon delivers the one it missed now
    db = sqlite3.connect(d.state / "invocations.db")
    with db:
        db.execute("UPDATE schedules SET last_tick = ?", (time.time() - 90,))
    db.close()
    _daemon(hourai_daemon, receiver)
    wait_until(lambda: receiver.named("process tick"), timeout=30)
    (run,) = receiver.named("process tick")
    assert run.kind == CONSUMER and run.parent == "" and run.links == []
    assert run.attributes["faas.trigger"] == "timer"
    assert run.attributes["hourai.source"] == "schedule"
    assert not receiver.named("publish tick")  # nothing but the clock queued it
    wait_until(lambda: "hourai.invoke" in {s.name for s in receiver.trace(run.trace_id)})


@needs_redis
@pytest.mark.slow
def test_a_stream_entrys_traceparent_is_linked_from_its_batch(
    hourai_daemon,
    receiver: Receiver,
    tmp_path: Path,
    redis_url: str,  # noqa: F811
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    first, first_trace = _caller(5)
    second, second_trace = _caller(6)
    # already in the stream when the consumer starts: one batch of the three
    r.xadd("orders", {"body": json.dumps({"n": 1}), "traceparent": first})
    r.xadd("orders", {"body": json.dumps({"n": 2}), "traceparent": second})
    r.xadd("orders", {"body": json.dumps({"n": 3})})
    r.xadd("orders", {"body": json.dumps({"n": 4}), "traceparent": "not one"})
    d = _daemon(hourai_daemon, receiver)
    d.cli(
        "deploy",
        "consumer",
        _job(
            tmp_path,
            "consumer",
            f'trigger = {{type = "redis-stream", url = "{redis_url}", stream = "orders", '
            "batch_size = 10, batch_window = 0.2}\n",
        ),
    )
    wait_until(
        lambda: (
            r.xpending("orders", "hourai")["pending"] == 0 and receiver.named("process consumer")
        ),
        timeout=30,
    )
    (run,) = receiver.named("process consumer")
    assert run.kind == CONSUMER and run.parent == ""
    # a link per entry that carried a trace context (the broken one is ignored)
    assert run.links == [
        (first_trace, f"{CALLER_SPAN:016x}"),
        (second_trace, f"{CALLER_SPAN:016x}"),
    ]
    assert run.attributes["messaging.system"] == "redis"
    assert run.attributes["messaging.destination.name"] == "orders"
    assert run.attributes["messaging.batch.message_count"] == 4


def test_a_run_is_recorded_when_what_queued_it_was() -> None:
    import socket

    from hourai.tracing import Tracer, TracingSettings

    with socket.socket() as s:  # nobody listens: nothing is exported, nothing is needed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tracer = Tracer(
        TracingSettings(
            enabled=True, endpoint=f"http://127.0.0.1:{port}/v1/traces", sample_ratio=0.0
        )
    )
    try:
        sampled, _ = _caller(7)
        unsampled = sampled[:-2] + "00"
        assert not tracer.request("process f", (), {}, kind="consumer").sampled
        assert tracer.request("process f", (), {}, links=[sampled], kind="consumer").sampled
        run = tracer.request("process f", (), {}, links=[unsampled], kind="consumer")
        assert not run.sampled
        # an accept continues its caller's decision, as a request does
        assert tracer.accepting("f", traceparent=sampled).traceparent.endswith("-01")
        assert tracer.accepting("f").traceparent.endswith("-00")
    finally:
        tracer.shutdown(timeout=0.5)
