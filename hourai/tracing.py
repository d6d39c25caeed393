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

Linking (for asynchronous invocations, schedules and triggers, hourai/invocations): pass
the traceparent of whatever caused the invocation (the enqueueing request, a trigger's
message) as ``Runtime.invoke(..., trace_links=[traceparent])``; it becomes a span link on
the invocation's root span, so the later trace points back to the one that enqueued it.
``Runtime.invoke(..., traceparent=...)`` instead makes the invocation a child of it.
"""

from __future__ import annotations

import logging
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


class RequestTrace:
    """One request's spans while it is on its way; made by :meth:`Tracer.request`."""

    __slots__ = ("invoke", "queue", "root", "submitted", "traceparent", "tracer")

    def __init__(self, tracer: Tracer, root: Any, queue: Any, submitted: int) -> None:
        self.tracer = tracer
        self.root = root
        self.queue = queue
        self.submitted = submitted
        self.invoke: Any = None
        self.traceparent: str | None = None

    @property
    def trace_id(self) -> str:
        return f"{self.root.get_span_context().trace_id:032x}"

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
        sdk = self.tracer
        now = _ns()
        queue = self.queue
        if queue.is_recording():
            ctx = sdk.in_span(queue)
            begin = now
            if fork is not None:
                begin = min(begin, fork[0])
            if build is not None:
                begin = min(begin, build[0])
            begin = max(begin, self.submitted)
            span = sdk.tracer.start_span(
                "hourai.start", ctx, attributes={"hourai.start": start}, start_time=begin
            )
            inner = sdk.in_span(span)
            if build is not None:
                sdk.tracer.start_span(
                    "hourai.snapshot.build", inner, start_time=max(build[0], begin)
                ).end(max(build[1], begin))
            if fork is not None:
                sdk.tracer.start_span("hourai.fork", inner, start_time=max(fork[0], begin)).end(
                    max(fork[1], begin)
                )
            span.end(now)
            queue.end(now)
        self.invoke = sdk.tracer.start_span(
            "hourai.invoke",
            sdk.in_span(self.root),
            attributes={
                "hourai.start": start,
                "hourai.worker.pid": pid,
                "faas.invocation_id": request_id,
            },
            start_time=now,
        )
        c = self.invoke.get_span_context()
        self.traceparent = format_traceparent(c.trace_id, c.span_id, int(c.trace_flags))
        return self.traceparent

    def done(self, status: int, start: str, error_id: str | None = None) -> None:
        now = _ns()
        root = self.root
        if self.invoke is None:
            if self.queue.is_recording():
                self.queue.end(now)
        else:
            if error_id is not None and self.invoke.is_recording():
                self.invoke.set_attribute("hourai.error_id", error_id)
                self.invoke.set_status(self.tracer.error_status)
            self.invoke.end(now)
        if root.is_recording():
            root.set_attribute("http.response.status_code", status)
            root.set_attribute("hourai.start", start)
            if status >= 500:
                root.set_status(self.tracer.error_status)
            root.end(now)


class Tracer:
    """The SDK's tracer provider, its OTLP exporter and batch processor, and what was lost."""

    def __init__(self, settings: TracingSettings) -> None:
        # The SDK is imported only when tracing is on: a daemon without it starts as fast.
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace import (
            NonRecordingSpan,
            SpanContext,
            SpanKind,
            Status,
            StatusCode,
            TraceFlags,
            TraceState,
        )

        self.settings = settings
        self.dropped = 0
        self.exported = 0
        self._trace = trace
        self._span_context = SpanContext
        self._non_recording = NonRecordingSpan
        self._flags = TraceFlags
        self._trace_state = TraceState
        self.server_kind = SpanKind.SERVER
        self.error_status = Status(StatusCode.ERROR)
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name}),
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        )
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
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("hourai")

    def in_span(self, span: Any) -> Any:
        return self._trace.set_span_in_context(span)

    def _remote(self, traceparent: str | None, tracestate: str | None = None) -> Any:
        parsed = parse_traceparent(traceparent)
        if parsed is None:
            return None
        trace_id, span_id, flags = parsed
        state = self._trace_state.from_header([tracestate]) if tracestate else None
        ctx = self._span_context(
            trace_id, span_id, is_remote=True, trace_flags=self._flags(flags & 1), trace_state=state
        )
        return ctx

    def request(
        self,
        name: str,
        headers: Sequence[tuple[str, str]],
        attributes: dict[str, Any],
        *,
        traceparent: str | None = None,
        links: Sequence[str] = (),
    ) -> RequestTrace:
        """The root span of one request (continuing the caller's traceparent, if it sent
        one) and its queue span, both started now."""
        now = _ns()
        if traceparent is None:
            tracestate = None
            for key, value in headers:
                if key == "traceparent":
                    traceparent = value
                elif key == "tracestate":
                    tracestate = value
        else:
            tracestate = None
        remote = self._remote(traceparent, tracestate)
        parent = (
            None if remote is None else self._trace.set_span_in_context(self._non_recording(remote))
        )
        span_links = None
        if links:
            from opentelemetry.trace import Link

            span_links = [Link(c) for c in (self._remote(t) for t in links) if c is not None]
        root = self.tracer.start_span(
            name,
            parent,
            kind=self.server_kind,
            attributes=attributes,
            links=span_links,
            start_time=now,
        )
        queue = self.tracer.start_span("hourai.queue", self.in_span(root), start_time=now)
        return RequestTrace(self, root, queue, now)

    def shutdown(self, timeout: float = 2.0) -> None:
        """Export what is queued (for at most ``timeout`` seconds), then stop the thread."""
        try:
            self.processor.force_flush(int(timeout * 1000))
        finally:
            self.provider.shutdown()


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
