"""What a worker knows about the invocation it is running, for the function's lines and spans.

Log context. Every line the function writes through ``sys.stdout``/``sys.stderr`` (print,
logging's stream handlers, tracebacks) while an invocation runs starts with a mark naming
it, ``\\x1f<request id>[ <trace id>]\\x1f``, which the daemon takes off again and puts in
the function's log (``[hello#1234 req=1f-1234]``) and in the JSON log. The streams are
wrapped in the snapshot, before the function is imported, so handlers that keep a
reference to ``sys.stderr`` from import time get the wrapper too. What bypasses Python's
streams (a C library writing to fd 2, a subprocess) is not marked. In thread isolation the
mark follows asyncio tasks, and the pool thread a sync function runs in gets a copy of its
task's context (:func:`hourai.isolate.adapters.in_thread`); a thread the function starts
itself begins with an empty context, as Python's threads do, and writes unmarked lines.

Trace context. With tracing on, the ``inv`` frame carries ``trace`` (the traceparent of
hourai's invocation span). The function sees it as the ``traceparent`` header; and, when
the function has imported opentelemetry-api, it is also made the current OpenTelemetry
context for the call (in thread isolation too, where it travels with the mark), so spans
the function starts are children of hourai's. We never import OpenTelemetry ourselves: a
worker whose function does not use it pays nothing.
"""

from __future__ import annotations

import sys
from contextvars import ContextVar
from typing import Any, TextIO

MARK_START = "\x1f"  # not \x1e: str.splitlines() would split there
MARK_END = "\x1f"

_mark: ContextVar[str | None] = ContextVar("hourai_invocation_mark", default=None)


class _Marked:
    """A text stream that starts each line written during an invocation with its mark."""

    def __init__(self, inner: TextIO) -> None:
        self._inner = inner
        self._at_line_start = True

    def write(self, text: str) -> int:
        mark = _mark.get()
        if mark is None or not text:
            if text:
                self._at_line_start = text.endswith("\n")
            return self._inner.write(text)
        body = text[:-1].replace("\n", "\n" + mark) + text[-1]
        if self._at_line_start:
            body = mark + body
        self._at_line_start = text.endswith("\n")
        self._inner.write(body)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def install() -> None:
    """Wrap sys.stdout and sys.stderr (once, in the snapshot)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _Marked):
            setattr(sys, name, _Marked(stream))


def enter(inv: dict[str, Any]) -> tuple[Any, Any]:
    """Make ``inv`` the current invocation; returns what :func:`leave` needs."""
    traceparent = inv.get("trace")
    request_id = inv.get("request_id", "-")
    if isinstance(traceparent, str) and len(traceparent) >= 35:
        mark = f"{MARK_START}{request_id} {traceparent[3:35]}{MARK_END}"
        otel = _attach(traceparent)
    else:
        mark = f"{MARK_START}{request_id}{MARK_END}"
        otel = None
    return _mark.set(mark), otel


def leave(tokens: tuple[Any, Any]) -> None:
    mark, otel = tokens
    _mark.reset(mark)
    if otel is not None:
        try:
            sys.modules["opentelemetry.context"].detach(otel)
        except Exception:
            pass


def _attach(traceparent: str) -> Any:
    # Only when the function has imported opentelemetry-api (then it is in sys.modules):
    # importing it for a function that does not use it would cost every worker its import.
    trace = sys.modules.get("opentelemetry.trace")
    context = sys.modules.get("opentelemetry.context")
    if trace is None or context is None:
        return None
    try:
        parts = traceparent.split("-")
        span_context = trace.SpanContext(
            int(parts[1], 16),
            int(parts[2], 16),
            is_remote=True,
            trace_flags=trace.TraceFlags(int(parts[3], 16) & 1),
        )
        ctx = trace.set_span_in_context(trace.NonRecordingSpan(span_context))
        return context.attach(ctx)
    except Exception:
        return None  # a function's broken OpenTelemetry must not fail its requests
