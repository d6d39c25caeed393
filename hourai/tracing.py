"""OpenTelemetry traces of every invocation: the daemon's side.

Off by default; ``[tracing]`` in the config turns it on. The runtime then holds one
:class:`Tracer` (``Runtime.tracer``; None when off, so the request path pays one attribute
check) and every request gets a :class:`RequestTrace` on its ``Pending``:

```
<METHOD> <function>        SERVER span; continues the caller's W3C traceparent, or starts
 ├─ hourai.queue           a trace. Submit to the scheduler until a worker takes it
 │   └─ hourai.start       the start path (attribute hourai.start: warm|spare|fork|cold)
 │       ├─ hourai.snapshot.build   cold only: the function's snapshot being built
 │       └─ hourai.fork             fork and cold: the worker being forked
 └─ hourai.invoke          the worker running the function; its context is what the
                           function sees as ``traceparent`` (and, where the function
                           uses opentelemetry-api, as the current context)
```

Spans are made on the event loop with the SDK (a few microseconds each) and handed to a
``BatchSpanProcessor``, whose own thread exports them over OTLP: a slow or absent
collector fills the processor's queue, never the loop. What the queue cannot hold, and
what an export fails to deliver, is counted in :attr:`Tracer.dropped`
(``hourai_trace_spans_dropped_total``).

Asynchronous invocations, schedules and triggers (hourai/invocations) follow OpenTelemetry's
messaging conventions, producer and consumer::

    POST <function>          SERVER: the request that queued an event (202), as above;
     └─ publish <function>   PRODUCER: its durable commit. This span's context is stored
                             with the event: the event's "creation context"
    ...later, per attempt, a trace of its own:
    process <function>       CONSUMER root (:meth:`Tracer.request` with ``kind="consumer"``),
     ├─ hourai.queue ...     with a span link to each creation context it delivers: the
     └─ hourai.invoke        stored one; for a trigger's batch, each message's traceparent

(:class:`AcceptTrace` makes the first two; ``hourai invoke --async`` has no HTTP request, so
its ``publish`` span is the root, or a child of the traceparent the caller gave.) A link and
not a parent: see hourai.invocations.runner. ``Runtime.invoke(..., traceparent=...)``
instead makes an invocation a child of the given context.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("hourai.tracing")

PROTOCOLS = ("http/protobuf", "grpc")


@dataclass(frozen=True)
class TracingSettings:
    enabled: bool = False
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    protocol: str = "http/protobuf"
    sample_ratio: float = 1.0
    service_name: str = "hourai"
    timeout: float = 10.0  # seconds one export may take
    max_queue_size: int = 2048  # spans waiting for export; beyond that they are dropped


def parse_traceparent(value: str | None) -> tuple[int, int, int] | None:
    """(trace id, parent span id, flags) of a W3C traceparent, or None if it is not one."""
    if not value or len(value) < 55:
        return None
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff":
        return None
    if len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    if parts[0] == "00" and len(parts) != 4:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, flags


def format_traceparent(trace_id: int, span_id: int, flags: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{flags & 0xFF:02x}"


def _ns() -> int:
    return time.time_ns()


_ID64 = (1 << 64) - 1


class RequestTrace:
    """One request's spans while it is on its way; made by :meth:`Tracer.request`.

    Nothing of the SDK runs while the request is in flight: ids come from ``random``,
    times from ``time_ns``, and the spans are built at the end, as the SDK's finished
    ``ReadableSpan``, and handed to its batch processor (2 µs a span, where the SDK's own
    start_span/end take about 30 µs with sampler, attribute checks and locks)."""

    __slots__ = (
        "attributes",
        "kind",
        "links",
        "name",
        "parent",
        "root_id",
        "sampled",
        "spans",
        "submitted",
        "trace_id",
        "traceparent",
        "tracer",
    )

    def __init__(
        self,
        tracer: Tracer,
        name: str,
        trace_id: int,
        parent: Any,
        sampled: bool,
        attributes: dict[str, Any],
        links: Any,
        kind: str = "server",
    ) -> None:
        self.tracer = tracer
        self.kind = kind  # of the root span: server (an HTTP request) or consumer
        self.name = name
        self.trace_id = trace_id
        self.parent = parent  # the caller's SpanContext, or None
        self.sampled = sampled
        self.attributes = attributes
        self.links = links
        self.root_id = _new_id()
        self.submitted = _ns()
        # (name, span id, parent id, start, end, attributes) of the finished children
        self.spans: list[tuple[str, int, int, int, int, dict[str, Any] | None]] = []
        self.traceparent: str | None = None

    @property
    def trace_id_hex(self) -> str:
        return f"{self.trace_id:032x}"

    def dispatched(
        self,
        start: str,
        pid: int,
        request_id: str,
        *,
        fork: tuple[int, int] | None = None,
        build: tuple[int, int] | None = None,
    ) -> str:
        """The request reached a worker by ``start``; ``fork`` and ``build`` are the
        (start, end) wall-clock ns of the worker's fork and the snapshot's build where they
        were part of this start. Returns the traceparent the function sees."""
        now = _ns()
        invoke_id = _new_id()
        if self.sampled:
            spans = self.spans
            queue_id, start_id = _new_id(), _new_id()
            submitted = self.submitted
            spans.append(("hourai.queue", queue_id, self.root_id, submitted, now, None))
            begin = now
            if fork is not None:
                begin = min(begin, fork[0])
            if build is not None:
                begin = min(begin, build[0])
            begin = max(begin, submitted)
            spans.append(("hourai.start", start_id, queue_id, begin, now, {"hourai.start": start}))
            if build is not None:
                spans.append(
                    (
                        "hourai.snapshot.build",
                        _new_id(),
                        start_id,
                        max(build[0], begin),
                        max(build[1], begin),
                        None,
                    )
                )
            if fork is not None:
                spans.append(
                    (
                        "hourai.fork",
                        _new_id(),
                        start_id,
                        max(fork[0], begin),
                        max(fork[1], begin),
                        None,
                    )
                )
            spans.append(
                (
                    "hourai.invoke",
                    invoke_id,
                    self.root_id,
                    now,
                    0,
                    {
                        "hourai.start": start,
                        "hourai.worker.pid": pid,
                        "faas.invocation_id": request_id,
                    },
                )
            )
        self.traceparent = (
            f"00-{self.trace_id:032x}-{invoke_id:016x}-{'01' if self.sampled else '00'}"
        )
        return self.traceparent

    def done(self, status: int, start: str, error_id: str | None = None) -> None:
        """The answer: ``status``, and ``error_id`` if the function failed (a 500, or a
        direct invocation's function error, which Lambda answers with a 200)."""
        if not self.sampled:
            return
        now = _ns()
        tracer = self.tracer
        spans = self.spans
        if not spans:  # answered before any worker took it (refused, timed out in the queue)
            spans.append(("hourai.queue", _new_id(), self.root_id, self.submitted, now, None))
        attributes = self.attributes
        attributes["http.response.status_code"] = status
        attributes["hourai.start"] = start
        trace_id = self.trace_id
        tracer.emit(
            self.name,
            trace_id,
            self.root_id,
            self.parent,
            self.submitted,
            now,
            attributes,
            status >= 500 or error_id is not None,
            self.links,
            kind=self.kind,
        )
        for name, span_id, parent_id, begin, end, attrs in spans:
            failed = False
            if name == "hourai.invoke":
                end = now
                if error_id is not None and attrs is not None:
                    attrs["hourai.error_id"] = error_id
                    failed = True
            parent = tracer.context(trace_id, parent_id)
            tracer.emit(name, trace_id, span_id, parent, begin, end, attrs, failed)


class AcceptTrace:
    """The spans of one event being queued; made by :meth:`Tracer.accepting`, ended by
    :meth:`done` once the event is durable (or refused)."""

    __slots__ = (
        "attributes",
        "function",
        "parent",
        "producer_id",
        "request",
        "sampled",
        "server_id",
        "started",
        "trace_id",
        "tracer",
    )

    def __init__(
        self,
        tracer: Tracer,
        function: str,
        trace_id: int,
        parent: Any,
        sampled: bool,
        request: str | None,
        attributes: dict[str, Any] | None,
    ) -> None:
        self.tracer = tracer
        self.function = function
        self.trace_id = trace_id
        self.parent = parent
        self.sampled = sampled
        self.request = request
        self.attributes = attributes
        self.server_id = _new_id() if request is not None else 0
        self.producer_id = _new_id()
        self.started = _ns()

    @property
    def traceparent(self) -> str:
        """The event's creation context: the ``publish`` span."""
        return format_traceparent(self.trace_id, self.producer_id, 1 if self.sampled else 0)

    def done(self, status: int, invocation_id: str | None) -> None:
        """Queued as ``invocation_id`` and answered ``status`` (None and an error status:
        it could not be stored)."""
        if not self.sampled:
            return
        now = _ns()
        tracer = self.tracer
        failed = invocation_id is None
        parent = self.parent
        if self.request is not None:
            attributes = dict(self.attributes or {})
            attributes["http.response.status_code"] = status
            tracer.emit(
                self.request,
                self.trace_id,
                self.server_id,
                parent,
                self.started,
                now,
                attributes,
                status >= 500,
                kind="server",
            )
            parent = tracer.context(self.trace_id, self.server_id)
        publish: dict[str, Any] = {
            "messaging.system": "hourai",
            "messaging.operation.type": "publish",
            "messaging.operation.name": "publish",
            "messaging.destination.name": self.function,
            "faas.name": self.function,
        }
        if invocation_id is not None:
            publish["messaging.message.id"] = invocation_id
        tracer.emit(
            f"publish {self.function}",
            self.trace_id,
            self.producer_id,
            parent,
            self.started,
            now,
            publish,
            failed,
            kind="producer",
        )


class Tracer:
    """hourai's spans, the SDK's batch processor and OTLP exporter, and what was lost."""

    def __init__(self, settings: TracingSettings) -> None:
        # The SDK is imported only when tracing is on: a daemon without it starts as fast.
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import (
            Link,
            SpanContext,
            SpanKind,
            Status,
            StatusCode,
            TraceFlags,
            TraceState,
        )

        quiet_sdk_logs()
        self.settings = settings
        self.dropped = 0
        self.exported = 0
        self._readable = ReadableSpan
        self._span_context = SpanContext
        self._link = Link
        self._trace_state = TraceState
        self._sampled = TraceFlags(TraceFlags.SAMPLED)
        self._unsampled = TraceFlags(TraceFlags.DEFAULT)
        self._kinds = {
            "server": SpanKind.SERVER,
            "internal": SpanKind.INTERNAL,
            "producer": SpanKind.PRODUCER,
            "consumer": SpanKind.CONSUMER,
        }
        self._error = Status(StatusCode.ERROR)
        self._unset = Status(StatusCode.UNSET)
        self._resource = Resource.create({"service.name": settings.service_name})
        self._scope = InstrumentationScope("hourai")
        # As the SDK's TraceIdRatioBased: the low 64 bits of the trace id against a bound.
        self._bound = round(settings.sample_ratio * (1 << 64))
        self.processor = _CountingProcessor(
            BatchSpanProcessor(
                _CountingExporter(self, _exporter(settings)),
                max_queue_size=settings.max_queue_size,
                max_export_batch_size=min(512, settings.max_queue_size),
                # a trace is looked at right after the request: a second, not the SDK's five
                schedule_delay_millis=1000,
            ),
            self,
            settings.max_queue_size,
        )

    def _remote(self, traceparent: str | None, tracestate: str | None = None) -> Any:
        parsed = parse_traceparent(traceparent)
        if parsed is None:
            return None
        trace_id, span_id, flags = parsed
        state = self._trace_state.from_header([tracestate]) if tracestate else None
        return self._span_context(
            trace_id,
            span_id,
            is_remote=True,
            trace_flags=self._sampled if flags & 1 else self._unsampled,
            trace_state=state,
        )

    def request(
        self,
        name: str,
        headers: Sequence[tuple[str, str]],
        attributes: dict[str, Any],
        *,
        traceparent: str | None = None,
        links: Sequence[str] = (),
        kind: str = "server",
    ) -> RequestTrace:
        """The trace of one request, started now: continuing the caller's traceparent (its
        sampled flag decides), else a new trace, kept at ``sample_ratio`` — or kept, when
        one of the ``links`` (creation contexts, for a CONSUMER root) was sampled: who
        traced the enqueueing request wants to see what it caused."""
        parent = self._parent(headers, traceparent)
        trace_id, sampled = self._decide(parent)
        span_links = None
        if links:
            linked = [c for c in map(self._remote, links) if c is not None]
            if parent is None and not sampled:
                sampled = any(c.trace_flags & 1 for c in linked)
            if sampled:
                span_links = [self._link(c) for c in linked]
        return RequestTrace(self, name, trace_id, parent, sampled, attributes, span_links, kind)

    def accepting(
        self,
        function: str,
        headers: Sequence[tuple[str, str]] = (),
        *,
        request: str | None = None,
        attributes: dict[str, Any] | None = None,
        traceparent: str | None = None,
    ) -> AcceptTrace:
        """The trace of an event being queued for ``function``, started now: with
        ``request`` (the name of the HTTP request that queued it) a SERVER span of that
        name with ``attributes``, and under it (or, without, as the root or a child of
        the caller's context) the PRODUCER span ``publish <function>``, whose context
        :attr:`AcceptTrace.traceparent` is stored with the event."""
        parent = self._parent(headers, traceparent)
        trace_id, sampled = self._decide(parent)
        return AcceptTrace(self, function, trace_id, parent, sampled, request, attributes)

    def _parent(self, headers: Sequence[tuple[str, str]], traceparent: str | None) -> Any:
        """The caller's SpanContext: ``traceparent`` if given, else the headers' (or None)."""
        tracestate = None
        if traceparent is None:
            for key, value in headers:
                if key == "traceparent":
                    traceparent = value
                elif key == "tracestate":
                    tracestate = value
        return self._remote(traceparent, tracestate) if traceparent else None

    def _decide(self, parent: Any) -> tuple[int, bool]:
        """(trace id, sampled): the parent's, else a new trace kept at ``sample_ratio``."""
        if parent is not None:
            return parent.trace_id, bool(parent.trace_flags & 1)
        trace_id = random.getrandbits(128) or 1
        return trace_id, (trace_id & _ID64) < self._bound

    def context(self, trace_id: int, span_id: int) -> Any:
        return self._span_context(trace_id, span_id, False, self._sampled)

    def emit(
        self,
        name: str,
        trace_id: int,
        span_id: int,
        parent: Any,
        start: int,
        end: int,
        attributes: dict[str, Any] | None,
        failed: bool,
        links: Any = None,
        *,
        kind: str = "internal",
    ) -> None:
        """One finished span to the exporter (``parent``: a SpanContext, or None; ``kind``:
        server, internal, producer or consumer)."""
        span = self._readable(
            name,
            self._span_context(trace_id, span_id, False, self._sampled),
            parent=parent,
            resource=self._resource,
            attributes=attributes,
            kind=self._kinds[kind],
            links=links or (),
            status=self._error if failed else self._unset,
            start_time=start,
            end_time=end,
            instrumentation_scope=self._scope,
        )
        self.processor.on_end(span)

    def shutdown(self, timeout: float = 2.0) -> None:
        """Export what is queued, giving up after ``timeout`` seconds (a daemon stopping
        must not wait on an absent collector)."""
        # Not force_flush: it ignores its timeout and exports synchronously, each batch
        # retried up to the exporter's own timeout. The batch processor's shutdown has the
        # worker thread export what is left and waits for it only so long.
        batch = getattr(self.processor.inner, "_batch_processor", None)
        if batch is not None:
            batch.shutdown(timeout_millis=int(timeout * 1000))
        else:
            self.processor.shutdown()


def _new_id() -> int:
    return random.getrandbits(64) or 1


def _exporter(settings: TracingSettings) -> Any:
    if settings.protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )
        except ImportError:
            raise RuntimeError(
                "[tracing] protocol = 'grpc' needs opentelemetry-exporter-otlp-proto-grpc "
                "installed beside hourai (pip install opentelemetry-exporter-otlp-proto-grpc)"
            ) from None
        return GrpcExporter(endpoint=settings.endpoint, timeout=settings.timeout)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=settings.endpoint, timeout=settings.timeout)


class _CountingExporter:
    """Counts what each export delivered and what it lost (a failed export drops its batch)."""

    def __init__(self, owner: Tracer, inner: Any) -> None:
        self._owner = owner
        self._inner = inner

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            result = self._inner.export(spans)
        except Exception:
            result = SpanExportResult.FAILURE
        if result == SpanExportResult.SUCCESS:
            self._owner.exported += len(spans)
        else:
            self._owner.dropped += len(spans)
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(getattr(self._inner, "force_flush", lambda *_: True)(timeout_millis))


class _CountingProcessor:
    """The batch processor, counting the spans its full queue turns away.

    The SDK drops them with a log line and keeps no count one can read; its queue is a
    bounded deque, so a span that arrives when it is full is one dropped."""

    def __init__(self, inner: Any, owner: Tracer, limit: int) -> None:
        self.inner = inner
        self._inner = inner
        self._owner = owner
        self._limit = limit
        batch = getattr(inner, "_batch_processor", None)
        self._queue = getattr(batch, "_queue", None)

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self._inner.on_start(span, parent_context=parent_context)

    def on_end(self, span: Any) -> None:
        if self._queue is not None and len(self._queue) >= self._limit:
            self._owner.dropped += 1
        self._inner.on_end(span)

    def _on_ending(self, span: Any) -> None:
        pass

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self._inner.force_flush(timeout_millis))


def quiet_sdk_logs() -> None:
    """A missing collector must not flood the daemon's log: the SDK logs every failed
    export and every dropped span; the count says as much, once per scrape."""
    for name in (
        "opentelemetry.sdk._shared_internal",
        "opentelemetry.exporter.otlp.proto.http.trace_exporter",
        "opentelemetry.exporter.otlp.proto.grpc.exporter",
    ):
        logging.getLogger(name).setLevel(logging.CRITICAL)
