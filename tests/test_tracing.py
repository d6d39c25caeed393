"""Traces for real: a daemon exports over OTLP/HTTP to a receiver on a loopback port, and the
span tree (the caller's trace continued, queue, start path, snapshot build, invocation, the
function's own span under hourai's) is checked as it arrived. Plus each printed line's
request id (and trace id) in the function's log."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import wait_until
from otlp_receiver import Receiver, children, one

from hourai.tracing import format_traceparent, parse_traceparent

CALLER_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
CALLER_SPAN = 0xB7AD6B7169203331


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


FUNCTION = """
import json
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

provider = TracerProvider(resource=Resource.create({{"service.name": "user-fn"}}))
provider.add_span_processor(
    SimpleSpanProcessor(OTLPSpanExporter(endpoint="http://127.0.0.1:{port}/v1/traces"))
)
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("user")


def handler(event, context):
    with tracer.start_as_current_span("user.work"):
        print("working on", event["rawPath"])
    if event["rawPath"].endswith("/fail"):
        raise RuntimeError("asked to fail")
    return {{"seen": event["headers"].get("traceparent")}}
"""


def _deploy(hourai_daemon: Any, receiver: Receiver, extra: str = "") -> Any:
    d = hourai_daemon(
        "[defaults]\nspares = 0\n"
        f"[tracing]\nenabled = true\nendpoint = 'http://127.0.0.1:{receiver.port}/v1/traces'\n"
        + extra
    )
    fn = Path(hourai_daemon.root) / "traced"
    fn.mkdir()
    (fn / "handler.py").write_text(FUNCTION.format(port=receiver.port))
    fn.chmod(0o755)
    (fn / "handler.py").chmod(0o644)
    d.cli("deploy", "traced", str(fn / "handler.py"))
    return d


@pytest.mark.slow
def test_the_span_tree_arrives_over_otlp(hourai_daemon, receiver: Receiver) -> None:
    d = _deploy(hourai_daemon, receiver)
    # a lost snapshot is rebuilt by the next request: a true cold start
    zygote = next(
        p for p in psutil.Process(d.proc.pid).children() if "zygote" in " ".join(p.cmdline())
    )
    (snapshot,) = zygote.children()
    snapshot.kill()
    wait_until(lambda: not zygote.children())
    time.sleep(0.5)  # for the daemon to hear of the loss (there is nothing to poll for)
    caller = format_traceparent(CALLER_TRACE, CALLER_SPAN, 1)
    first = d.get("/traced/a", headers={"traceparent": caller})
    assert first.status == 200, first.body
    trace_id = f"{CALLER_TRACE:032x}"

    # hourai's root span continues the caller's trace; the function saw hourai's own span
    seen = parse_traceparent(first.json()["seen"])  # type: ignore[index]
    assert seen is not None and seen[0] == CALLER_TRACE and seen[1] != CALLER_SPAN

    names = {"GET traced", "hourai.queue", "hourai.start", "hourai.invoke", "user.work"}
    wait_until(lambda: names <= {s.name for s in receiver.trace(trace_id)}, timeout=20)
    wait_until(lambda: "hourai.snapshot.build" in {s.name for s in receiver.trace(trace_id)})
    spans = receiver.trace(trace_id)
    root = one(spans, "GET traced")
    assert root.parent == f"{CALLER_SPAN:016x}" and root.service == "hourai"
    assert root.attributes["http.response.status_code"] == 200
    assert {s.name for s in children(spans, root)} == {"hourai.queue", "hourai.invoke"}
    queue = one(spans, "hourai.queue")
    start = one(spans, "hourai.start")
    assert start.parent == queue.span_id and start.attributes["hourai.start"] == "cold"
    assert {s.name for s in children(spans, start)} == {"hourai.snapshot.build", "hourai.fork"}
    invoke = one(spans, "hourai.invoke")
    assert invoke.span_id == f"{seen[1]:016x}" and invoke.attributes["hourai.start"] == "cold"
    user = one(spans, "user.work")
    assert user.parent == invoke.span_id and user.service == "user-fn"

    # the next one is warm and starts a trace of its own (no traceparent sent)
    second = d.get("/traced/b")
    assert second.start == "warm"
    seen2 = parse_traceparent(second.json()["seen"])  # type: ignore[index]
    assert seen2 is not None and seen2[0] != CALLER_TRACE
    trace2 = f"{seen2[0]:032x}"
    wait_until(lambda: {"hourai.start", "user.work"} <= {s.name for s in receiver.trace(trace2)})
    spans2 = receiver.trace(trace2)
    assert one(spans2, "GET traced").parent == ""
    assert one(spans2, "hourai.start").attributes["hourai.start"] == "warm"
    assert one(spans2, "user.work").parent == one(spans2, "hourai.invoke").span_id

    # every line the function printed names its request and its trace
    log = d.cli("logs", "traced").stdout
    lines = [line for line in log.splitlines() if "working on" in line]
    assert len(lines) == 2, log
    assert f"trace={trace_id}" in lines[0] and "working on /traced/a" in lines[0]
    assert f"trace={trace2}" in lines[1] and re.search(r"req=[0-9a-f]+-\d+ ", lines[1])
    assert "\x1f" not in log

    # the exporter's counts are metrics; nothing was lost with the collector up
    from hourai.client import Client

    wait_until(lambda: "hourai_trace_spans_exported_total" in Client(d.socket).metrics())
    metrics = Client(d.socket).metrics()
    assert "hourai_trace_spans_dropped_total 0.0" in metrics


@pytest.mark.slow
def test_a_failed_requests_lines_are_found_from_its_error_id(
    hourai_daemon, receiver: Receiver
) -> None:
    d = _deploy(hourai_daemon, receiver, "[log]\nformat = 'json'\n")
    failed = d.get("/traced/fail")
    assert failed.status == 500
    error_id = failed.headers["x-hourai-error-id"]
    log = d.cli("logs", "traced").stdout
    (error_line,) = [line for line in log.splitlines() if f"error {error_id}" in line]
    request_id = re.search(r"req=([0-9a-f]+-\d+)", error_line).group(1)  # type: ignore[union-attr]
    mine = [line for line in log.splitlines() if f"req={request_id}" in line]
    assert any("working on /traced/fail" in line for line in mine)
    assert any("RuntimeError: asked to fail" in line for line in mine)
    # which `hourai logs --request` does from the error id alone
    found = d.cli("logs", "traced", "--request", error_id).stdout.splitlines()
    assert found == mine
    assert d.cli("logs", "traced", "--request", request_id).stdout.splitlines() == mine

    # the daemon's JSON log carries the same ids as fields
    def json_lines() -> list[dict[str, Any]]:
        out = []
        for line in d.lines:
            if line.startswith("{"):
                doc = json.loads(line)
                if doc.get("request_id") == request_id:
                    out.append(doc)
        return out

    # (the function's own lines stay in its log, not the daemon's: the daemon's line about
    # the failure is what its JSON log holds)
    wait_until(lambda: any(doc.get("error_id") == error_id for doc in json_lines()))
    assert all(len(doc.get("trace_id", "")) == 32 for doc in json_lines())
    # the invocation span of a failure carries the error id
    wait_until(
        lambda: any(
            s.name == "hourai.invoke" and s.attributes.get("hourai.error_id") == error_id
            for s in receiver.spans
        ),
        timeout=20,
    )


THREADED = """
import json
import threading
import time
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

provider = TracerProvider(resource=Resource.create({{"service.name": "user-fn"}}))
provider.add_span_processor(
    SimpleSpanProcessor(OTLPSpanExporter(endpoint="http://127.0.0.1:{port}/v1/traces"))
)
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("user")


def _work(token):
    began = time.time()
    print("begin", token)
    time.sleep(0.6)
    print("end", token)
    return {{"began": began, "ended": time.time(), "thread": threading.current_thread().name}}


def handler(event, context):
    with tracer.start_as_current_span("user.threaded"):
        out = _work(event["rawPath"].rsplit("/", 1)[-1])
    return {{**out, "request_id": context.aws_request_id, "seen": event["headers"]["traceparent"]}}


def application(environ, start_response):
    out = _work(environ["PATH_INFO"].rsplit("/", 1)[-1])
    start_response("200 OK", [("content-type", "application/json")])
    return [json.dumps(out).encode()]
"""


@pytest.mark.slow
@pytest.mark.parametrize("attr", ["handler", "application"], ids=["handler", "wsgi"])
def test_sync_functions_in_thread_mode_keep_their_request_and_trace_context(
    hourai_daemon, receiver: Receiver, attr: str
) -> None:
    """concurrency > 1: a sync function runs in the worker's pool threads, two requests at
    once on one worker; each one's lines carry its own request id, and its spans nest under
    its own invocation span."""
    d = hourai_daemon(
        "[defaults]\nspares = 0\nconcurrency = 4\nmax_workers = 1\n"
        f"[tracing]\nenabled = true\nendpoint = 'http://127.0.0.1:{receiver.port}/v1/traces'\n"
    )
    fn = Path(hourai_daemon.root) / "threaded"
    fn.mkdir()
    (fn / "handler.py").write_text(THREADED.format(port=receiver.port))
    fn.chmod(0o755)
    (fn / "handler.py").chmod(0o644)
    d.cli("deploy", "threaded", f"{fn / 'handler.py'}:{attr}")
    assert d.get("/threaded/warm").status == 200  # the worker is up: the two overlap on it

    replies: dict[str, Any] = {}

    def call(token: str) -> None:
        replies[token] = d.get(f"/threaded/{token}")

    first = threading.Thread(target=call, args=("tok-one",))
    first.start()
    time.sleep(0.25)  # the second starts while the first sleeps (and no line is half written)
    call("tok-two")
    first.join()
    first_doc, second_doc = (replies[t].json() for t in ("tok-one", "tok-two"))
    assert all(replies[t].status == 200 for t in replies), replies
    # one worker, two pool threads at once
    threads = {first_doc["thread"], second_doc["thread"]}  # type: ignore[index]
    assert len(threads) == 2 and all(t.startswith("invocation") for t in threads)
    assert second_doc["began"] < first_doc["ended"]  # type: ignore[index]

    log = d.cli("logs", "threaded").stdout
    for token in ("tok-one", "tok-two"):
        lines = [line for line in log.splitlines() if line.endswith(f" {token}")]
        assert len(lines) == 2, log
        found = {re.search(r"req=([0-9a-f]+-\d+) ", line) for line in lines}
        assert None not in found, lines
        (request_id,) = {m.group(1) for m in found}  # type: ignore[union-attr]
        assert d.cli("logs", "threaded", "--request", request_id).stdout.splitlines() == lines
        if attr == "handler":
            assert replies[token].json()["request_id"] == request_id  # type: ignore[index]
            assert all("trace=" in line for line in lines)

    if attr == "handler":
        # the function's own span is a child of hourai's invocation span, in each trace
        for reply in (first_doc, second_doc):
            seen = parse_traceparent(reply["seen"])  # type: ignore[index]
            assert seen is not None
            trace_id = f"{seen[0]:032x}"
            wait_until(
                lambda t=trace_id: (
                    {"user.threaded", "hourai.invoke"} <= {s.name for s in receiver.trace(t)}
                )
            )
            spans = receiver.trace(trace_id)
            invoke = one(spans, "hourai.invoke")
            assert invoke.span_id == f"{seen[1]:016x}"
            assert one(spans, "user.threaded").parent == invoke.span_id


def test_an_absent_collector_costs_requests_nothing_and_drops_are_counted() -> None:
    import socket

    from hourai.tracing import Tracer, TracingSettings

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tracer = Tracer(
        TracingSettings(
            enabled=True,
            endpoint=f"http://127.0.0.1:{port}/v1/traces",
            timeout=10,
            max_queue_size=16,
        )
    )
    try:
        started = time.perf_counter()
        for i in range(200):
            t = tracer.request("GET f", [], {})
            t.dispatched("warm", 1, f"{i:x}-1")
            t.done(200, "warm")
        elapsed = time.perf_counter() - started
        # 800 spans; the exporter's thread is stuck connecting, the loop is not
        assert elapsed < 1.0, elapsed
        assert tracer.dropped >= 800 - 16 - 512  # at most a queue and a batch were taken
    finally:
        stopping = time.perf_counter()
        tracer.shutdown(timeout=0.5)
        # not the exporter's 10 s for each batch left
        assert time.perf_counter() - stopping < 3.0


def test_traceparent_parsing() -> None:
    good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert parse_traceparent(good) == (CALLER_TRACE, CALLER_SPAN, 1)
    assert format_traceparent(CALLER_TRACE, CALLER_SPAN, 1) == good
    for bad in (
        None,
        "",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
        good + "-extra",
    ):
        assert parse_traceparent(bad) is None, bad
    # a later version may add fields: its first four are still read
    assert parse_traceparent("01" + good[2:] + "-what") == (CALLER_TRACE, CALLER_SPAN, 1)


def test_lines_written_during_an_invocation_carry_its_mark() -> None:
    import io

    from hourai.isolate import context

    out = io.StringIO()
    stream = context._Marked(out)  # type: ignore[arg-type]
    stream.write("before\n")
    tokens = context.enter(
        {"request_id": "1f-42", "trace": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
    )
    print("one", "two", file=stream)  # type: ignore[arg-type]
    stream.write("three\nfour\npart")
    stream.write("ial\n")
    context.leave(tokens)
    stream.write("after\n")
    mark = "\x1f1f-42 " + "a" * 32 + "\x1f"
    assert out.getvalue().split("\n") == [
        "before",
        mark + "one two",
        mark + "three",
        mark + "four",
        mark + "partial",
        "after",
        "",
    ]
