"""HTTP/1.1 ingress: an asyncio protocol on httptools, no business logic.

Each connection gets one :class:`HttpProtocol`. It parses requests with httptools,
hands every complete request (whole body, never streamed) to an async handler as a
:class:`Request`, and writes the handler's :class:`Response` back, in request order.

What the protocol owns, and nothing else: framing, keep-alive, pipelining order,
request limits, timeouts, back-pressure, and refusing to put a malformed response
on the wire. Routing, access logs and the scheduler live behind the handler.

Status codes chosen where httptools is the judge:

* ``HttpParserInvalidMethodError`` (a method llhttp does not know, or garbage such as
  a TLS hello) -> 400. A method llhttp parses but we do not serve -> 501: ``CONNECT``
  (we are not a proxy) and a request with ``Upgrade`` that carries a body (httptools
  hands the body to the upgraded protocol, and we upgrade to nothing).
* Any version other than 1.0/1.1 -> 505; ``lenient_version`` lets llhttp parse e.g.
  ``HTTP/1.2`` so we can say 505 rather than 400. The HTTP/2 preface
  (``PRI * HTTP/2.0``) -> 505 as well.
* Everything else the parser rejects -> 400, with llhttp's reason in the body.

What the handler returns is checked before it reaches the wire. A header name that is
not a token, or a value with CR, LF or NUL or outside latin-1 -> 502 "invalid response
header from function"; a status outside 200-599 (a 1xx is never a final answer) -> 502
"invalid response status from function". An exception, or anything but a Response with
a bytes body -> 500 "internal error", logged with its traceback.

The head limit counts the request target, header names and values plus their framing.
httptools buffers a header line until it ends, out of our sight, so a line that never
ends is caught by counting whole reads instead (a long read in 4 KiB steps): it is cut
off within 4 KiB of the limit.

A missing ``Host`` is accepted (routing is by path, and hand-written clients omit
it); two ``Host`` headers or a ``Host`` with characters outside RFC 3986 authority
syntax are rejected with 400, since those are how proxies and functions get
disagreeing ideas of the target. An absolute-form target (RFC 7230 5.3.2) is served by
its path, and its authority replaces ``Host`` (RFC 7230 5.4).

A request with ``Upgrade`` (with or without ``Connection: upgrade``) is answered as
plain HTTP and is the connection's last: a proxy in front may take the upgrade for
granted and relay what follows as an opaque stream, which must never become requests.

Output and input are bounded per connection. At most ``max_pipeline`` handlers have an
answer not yet written; none start while the transport is above its high-water mark,
and then reading pauses too. A client that takes none of its pending output for
``write_timeout`` seconds is dropped (one reading slowly is not). Parsing stops once
``max_pipeline`` requests are queued; the rest of a read waits as bytes.

A response may stream its body (``Response.stream``, a :class:`BodyStream`): its head goes
out when it reaches the front of the queue, then each chunk as it comes, with
``transfer-encoding: chunked`` (to an HTTP/1.0 client: no length, the end of the connection
ends the body). Answers pipelined behind it wait for its end. Back-pressure reaches the
producer: when the transport's buffer is over its high-water mark the stream is paused,
and resumed when it drains. A client that goes away cancels the stream; a stream that
cannot finish (its producer died) drops the connection, so the client sees a cut-off body,
never a complete-looking one.

An EOF ends the client's input, not its interest: a client that half-closes after its
requests (``shutdown(SHUT_WR)``) gets the answer to every request it completed, then the
connection closes; a request it left incomplete gets none. A FIN cannot tell a
half-close from a client gone away, so handlers run to their end either way (the
scheduler's timeouts bound them); a reset cancels them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from functools import partial
from http import HTTPStatus
from typing import NoReturn, Protocol

import httptools

__all__ = [
    "BodyStream",
    "Handler",
    "HttpProtocol",
    "Limits",
    "Request",
    "Response",
    "StreamSink",
    "chunk_frame",
    "error_response",
    "serve",
]

logger = logging.getLogger("hourai.ingress")


@dataclass(slots=True)
class Request:
    """One complete HTTP request, as received (nothing decoded beyond latin-1)."""

    method: str
    target: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    http_version: str
    client: tuple[str, int]
    server: tuple[str, int]
    keep_alive: bool

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None


class StreamSink(Protocol):
    """Where a :class:`BodyStream` delivers its body: the client's connection."""

    def write(self, data: bytes) -> None: ...

    def end(self) -> None: ...

    def abort(self, reason: str) -> None: ...


class BodyStream(Protocol):
    """The rest of a response body, produced after its head.

    The ingress calls :meth:`attach` once the response is at the front of the connection's
    queue (its head written); from then on the stream calls the sink's ``write`` per chunk
    and ``end`` (or ``abort``) once. :meth:`pause` and :meth:`resume` follow the client's
    reading; :meth:`cancel` says the client is gone (nothing is written after it), and may
    come before :meth:`attach`.
    """

    def attach(self, sink: StreamSink) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def cancel(self) -> None: ...


@dataclass(slots=True)
class Response:
    """A response. Framing headers are the ingress's business, not the handler's.

    With ``stream``, ``body`` is the part produced so far and the stream brings the rest."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    stream: BodyStream | None = None


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Limits:
    """Per-connection limits; every one of them is enforced with a status, never silently."""

    max_header_bytes: int = 16 * 1024
    max_headers: int = 100
    max_body_bytes: int = 6 * 1024 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0
    # A connection whose unsent output the client takes none of for this long is dropped.
    write_timeout: float = 30.0
    max_pipeline: int = 32
    server_name: str = "hourai"


_DEFAULT_LIMITS = Limits()


def error_response(
    status: int, message: str, headers: list[tuple[str, str]] | None = None
) -> Response:
    """A plain-text response whose body is ``message`` and a newline."""
    hdrs = [("content-type", "text/plain; charset=utf-8")]
    if headers:
        hdrs.extend(headers)
    return Response(status, hdrs, (message + "\n").encode("utf-8"))


async def serve(
    handler: Handler,
    host: str,
    port: int,
    limits: Limits = _DEFAULT_LIMITS,
    *,
    sock: socket.socket | None = None,
    backlog: int = 2048,
    connections: set[HttpProtocol] | None = None,
) -> asyncio.base_events.Server:
    """Listen on ``host:port`` (or on ``sock``) and serve ``handler``; returns the started server.

    ``connections``, if given, is kept up to date with the open connections, so the
    owner can call :meth:`HttpProtocol.shutdown` on each when it stops. A port in use
    raises OSError.
    """
    loop = asyncio.get_running_loop()

    def factory() -> HttpProtocol:
        return HttpProtocol(handler, limits, connections=connections)

    if sock is not None:
        return await loop.create_server(factory, sock=sock, backlog=backlog)
    return await loop.create_server(factory, host, port, backlog=backlog, reuse_address=True)


# --- wire constants -------------------------------------------------------------------


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("ascii")


# Final statuses a handler may return; 1xx are interim and never a valid final answer.
_STATUS_LINES: dict[int, bytes] = {code: _status_line(code) for code in range(200, 600)}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_BODY_STATUSES = frozenset((204, 304))
_LARGE_BODY = 64 * 1024  # above this, head and body go out as two writes (no copy)
# A read holds up to 256 KiB, thousands of tiny pipelined requests (4.5 MB of Request
# objects measured). Longer reads are parsed this much at a time, so parsing can stop
# once max_pipeline requests wait: the rest stays as bytes until the queue drains.
_FEED_STEP = 4096
# Unsent bytes the kernel may hold for a connection before send() says EAGAIN. Without
# it the send buffer autotunes to 4 MiB (tcp_wmem), all of it filled with answers for a
# client that reads none, so the transport never saw a backlog and nothing paused.
# Bytes in flight do not count, so a fast path over a long link keeps its throughput.
_NOTSENT_LOWAT = 128 * 1024
_LINGER = 2.0  # seconds to drain input after a final response, so our FIN is not an RST
_CACHE_MAX = 4096  # bound for the caches keyed by handler-chosen strings

_ALNUM = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# translate() with these tables deletes every allowed character: empty result = valid.
_NOT_TOKEN = str.maketrans("", "", "!#$%&'*+-.^_`|~" + _ALNUM)
# RFC 3986 authority: unreserved, pct-encoded, sub-delims, ":" and IP-literal brackets.
_NOT_HOST = str.maketrans("", "", "-._~%!$&'()*+,;=:[]" + _ALNUM)

_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}

# Response headers the ingress frames itself (values: how _render treats them).
_R_LENGTH, _R_TE, _R_CONNECTION, _R_DATE, _R_SERVER = 1, 2, 3, 4, 5
_RESPONSE_SPECIAL = {
    b"content-length: ": _R_LENGTH,
    b"transfer-encoding: ": _R_TE,
    b"connection: ": _R_CONNECTION,
    b"date: ": _R_DATE,
    b"server: ": _R_SERVER,
}
# Validated response header names -> b"lowercased-name: ". Names repeat across
# responses, so the token check runs once per distinct name.
_NAME_CACHE: dict[str, bytes] = {}
_HOST_CACHE: dict[str, bool] = {}

_date_second = 0
_date_line = b""


def _current_date_line() -> bytes:
    """``date: <IMF-fixdate>\\r\\n``, formatted at most once a second."""
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_line = b"date: " + formatdate(now, usegmt=True).encode("ascii") + b"\r\n"
        _date_second = now
    return _date_line


class _InvalidResponse(Exception):
    """The handler's response cannot be put on the wire as given."""


def _header_name(name: str) -> bytes:
    cached = _NAME_CACHE.get(name)
    if cached is not None:
        return cached
    if type(name) is not str or not name or not name.isascii() or name.translate(_NOT_TOKEN):
        raise _InvalidResponse("invalid response header from function")
    encoded = name.lower().encode("ascii") + b": "
    if len(_NAME_CACHE) < _CACHE_MAX:
        _NAME_CACHE[name] = encoded
    return encoded


def chunk_frame(data: bytes) -> bytes:
    """One chunk of a chunked body (an empty one would end the body, so it is nothing)."""
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)


_LAST_CHUNK = b"0\r\n\r\n"


def _render(
    resp: Response, head_only: bool, keep_alive: bool, http10: bool, server_line: bytes
) -> tuple[list[bytes], bytes, bool]:
    """Serialize ``resp``: (head parts, body to send, keep the connection open).

    A streaming response's head says ``transfer-encoding: chunked`` (HTTP/1.0: the
    connection closes after it) and its body so far comes back framed as a chunk.

    Raises _InvalidResponse for anything that would corrupt framing or smuggle a
    header; the caller answers 502 instead.
    """
    status = resp.status
    line = _STATUS_LINES.get(status) if type(status) is not bool else None
    if line is None:
        raise _InvalidResponse("invalid response status from function")
    parts = [line, b""]
    has_date = has_server = False
    length_override: str | None = None
    try:
        for name, value in resp.headers:
            bname = _header_name(name)
            # isprintable() is one C scan and false for CR, LF and NUL; only the
            # rare value with tabs or C1 characters pays for the precise checks.
            if not value.isprintable() and ("\r" in value or "\n" in value or "\0" in value):
                raise _InvalidResponse("invalid response header from function")
            kind = _RESPONSE_SPECIAL.get(bname)
            if kind is None:
                parts.append(bname + value.encode("latin-1") + b"\r\n")
            elif kind == _R_LENGTH:
                length_override = value.strip()
            elif kind == _R_CONNECTION:
                if "close" in (token.strip() for token in value.lower().split(",")):
                    keep_alive = False
            elif kind == _R_DATE:
                has_date = True
                parts.append(bname + value.encode("latin-1") + b"\r\n")
            elif kind == _R_SERVER:
                has_server = True
                parts.append(bname + value.encode("latin-1") + b"\r\n")
            # transfer-encoding: dropped, the body is always sent whole.
    except (TypeError, ValueError, AttributeError, UnicodeEncodeError) as exc:
        raise _InvalidResponse("invalid response header from function") from exc
    if not has_date:
        parts[1] = _current_date_line()
    if not has_server:
        parts.append(server_line)
    body = resp.body
    if status in _NO_BODY_STATUSES:
        body = b""
    elif resp.stream is not None:
        if http10:
            keep_alive = False
        else:
            parts.append(b"transfer-encoding: chunked\r\n")
        body = b"" if head_only else chunk_frame(body) if not http10 else body
    else:
        length = len(body)
        if head_only:
            # A HEAD handler may state the length of the body it did not produce.
            if (
                not length
                and length_override
                and length_override.isascii()
                and length_override.isdigit()
            ):
                length = int(length_override)
            body = b""
        parts.append(b"content-length: %d\r\n" % length)
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    elif http10:
        parts.append(b"connection: keep-alive\r\n")
    parts.append(b"\r\n")
    return parts, body, keep_alive


# --- the protocol ---------------------------------------------------------------------


class _Abort(Exception):
    """Raised inside a parser callback to stop parsing; the status is on the protocol."""


class _Exchange:
    """One request/response pair, queued in arrival order."""

    __slots__ = (
        "expect_continue",
        "head_only",
        "keep_alive",
        "request",
        "response",
        "started",
        "task",
    )

    def __init__(self, request: Request | None, keep_alive: bool, head_only: bool) -> None:
        self.request = request
        self.keep_alive = keep_alive
        self.head_only = head_only
        self.expect_continue = False
        self.started = False
        self.task: asyncio.Future[Response] | None = None
        self.response: Response | None = None


class _StreamWriter:
    """The sink of the response streaming at the front of a connection's queue."""

    __slots__ = ("chunked", "conn", "discard", "done", "ex", "stream")

    def __init__(
        self, conn: HttpProtocol, ex: _Exchange, stream: BodyStream, *, chunked: bool, discard: bool
    ) -> None:
        self.conn = conn
        self.ex = ex
        self.stream = stream
        self.chunked = chunked
        self.discard = discard  # HEAD, 204, 304: the head says it all
        self.done = False

    def write(self, data: bytes) -> None:
        if self.done or self.discard or not data or self.conn._closed:
            return
        self.conn._transport.write(chunk_frame(data) if self.chunked else data)

    def end(self) -> None:
        if not self.done:
            self.done = True
            self.conn._stream_ended(self, "")

    def abort(self, reason: str) -> None:
        if not self.done:
            self.done = True
            self.conn._stream_ended(self, reason or "stream aborted")


# Which client deadline the connection's single timer is enforcing.
# _IDLE and _LINGERING are about our writes as much as the client's reads: while the
# client is still taking response bytes, they are extended, not enforced. A stalled
# write has a timer of its own, since it overlaps every other state of the connection.
_NO_DEADLINE, _IDLE, _HEAD, _BODY, _LINGERING = 0, 1, 2, 3, 4


class HttpProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection: parse, dispatch to the handler, answer in order."""

    __slots__ = (
        "__weakref__",
        "_abort",
        "_active",
        "_began",
        "_body",
        "_body_size",
        "_chunked",
        "_closed",
        "_connections",
        "_content_length",
        "_current",
        "_deadline",
        "_deadline_kind",
        "_eof",
        "_expect",
        "_feeding",
        "_flushing",
        "_handler",
        "_head_size",
        "_headers",
        "_hosts",
        "_in_head",
        "_in_message",
        "_last_buffer_size",
        "_limits",
        "_loop",
        "_nheaders",
        "_parser",
        "_queue",
        "_raw",
        "_raw_body_limit",
        "_read_paused",
        "_server_line",
        "_stopped",
        "_streaming",
        "_timer",
        "_timer_when",
        "_transport",
        "_unparsed",
        "_upgrade",
        "_url",
        "_waiting",
        "_write_mark",
        "_write_paused",
        "_write_timer",
        "client",
        "server",
    )

    def __init__(
        self,
        handler: Handler,
        limits: Limits = _DEFAULT_LIMITS,
        *,
        connections: set[HttpProtocol] | None = None,
    ) -> None:
        self._handler = handler
        self._limits = limits
        self._connections = connections
        self._server_line = b"server: " + limits.server_name.encode("latin-1") + b"\r\n"
        # The body phase may carry chunk framing and trailers on top of the body
        # limit; this coarse bound only caps what httptools buffers internally.
        self._raw_body_limit = limits.max_header_bytes + 2 * limits.max_body_bytes + 65536
        self._parser = self._new_parser()
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._transport: asyncio.Transport = None  # type: ignore[assignment]
        self.client: tuple[str, int] = ("", 0)
        self.server: tuple[str, int] = ("", 0)
        self._queue: deque[_Exchange] = deque()
        self._waiting: deque[_Exchange] = deque()  # parsed, handler not started yet
        self._active = 0  # handlers started whose answer is not written yet
        self._unparsed = b""  # input read but not parsed while the queue is full
        self._feeding = False
        self._flushing = False
        self._eof = False  # the client sent all it will send
        self._current: _Exchange | None = None  # head parsed, body still arriving
        self._abort: tuple[int, str] | None = None
        self._closed = False  # transport closed or closing: write nothing more
        self._stopped = False  # read no more requests
        self._read_paused = False
        self._write_paused = False
        self._streaming: _StreamWriter | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._write_mark = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._deadline = 0.0
        self._deadline_kind = _NO_DEADLINE
        self._last_buffer_size = 0
        self._in_message = False
        self._in_head = False
        self._began = False
        self._raw = 0
        self._reset_message()

    def _new_parser(self) -> httptools.HttpRequestParser:
        parser = httptools.HttpRequestParser(self)
        # Parse any HTTP/x.y so that on_headers_complete can answer 505 instead of 400.
        parser.set_dangerous_leniencies(lenient_version=True)
        return parser

    def _reset_message(self) -> None:
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._head_size = 0
        self._nheaders = 0
        self._content_length = 0
        self._chunked = False
        self._expect: str | None = None
        self._hosts = 0
        self._upgrade = False
        self._body: list[bytes] | None = None
        self._body_size = 0

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            lowat = getattr(socket, "TCP_NOTSENT_LOWAT", None)
            if lowat is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, lowat, _NOTSENT_LOWAT)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client = (peer[0], peer[1])
        local = transport.get_extra_info("sockname")
        if isinstance(local, tuple):
            self.server = (local[0], local[1])
        if self._connections is not None:
            self._connections.add(self)
        self._set_deadline(_IDLE, self._limits.keep_alive_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._stopped = True
        self._deadline_kind = _NO_DEADLINE
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        self._cancel_queued()
        self._waiting.clear()
        self._unparsed = b""
        self._current = None
        if self._connections is not None:
            self._connections.discard(self)

    def eof_received(self) -> bool:
        # A half-closed client (shutdown(SHUT_WR) after its requests) still reads:
        # keep the write side open until every request it completed is answered.
        # A FIN looks the same whether the client half-closed or went away, so handlers
        # run to their end either way; an RST still cancels them (connection_lost).
        if self._eof:
            return not self._closed
        self._eof = True
        if self._closed or (self._stopped and not self._queue):
            return False
        if not self._unparsed:
            self._end_of_input()
        return not self._closed

    def data_received(self, data: bytes) -> None:
        if self._unparsed:  # a read that raced pause_reading: keep the order
            self._unparsed += data
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Parse ``data``, stopping once max_pipeline requests are queued (see _FEED_STEP)."""
        if self._stopped:
            return
        self._feeding = True
        try:
            if len(data) <= _FEED_STEP:
                self._feed_slice(data)
            else:
                view = memoryview(data)
                pos, end, limit = 0, len(data), self._limits.max_pipeline
                while pos < end and not self._stopped:
                    if len(self._queue) >= limit:
                        self._unparsed = bytes(view[pos:])
                        break
                    step = _FEED_STEP
                    if self._in_message and not self._in_head and not self._chunked:
                        # A body of known length goes in whole: nothing to stop for in it.
                        step = max(step, self._content_length - self._body_size)
                    self._feed_slice(view[pos : pos + step])
                    pos += step
        finally:
            self._feeding = False
        if self._stopped:
            self._unparsed = b""
            return
        if self._unparsed:
            self._update_reading()
        if self._read_paused and self._deadline_kind in (_HEAD, _BODY):
            # The rest of this message waits on us, not on the client.
            self._deadline_kind = _NO_DEADLINE

    def _feed_slice(self, data: bytes | memoryview) -> None:
        self._began = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # llhttp stops after a request asking for an upgrade; it was answered as
            # plain HTTP and ends the connection (on_headers_complete), so whatever
            # follows, meant for the other protocol, is never read as HTTP.
            return
        except httptools.HttpParserError as exc:
            self._parse_error(exc)
            return
        if self._in_message:
            if not self._began:
                # A message spanning several reads: count whole reads, since httptools
                # buffers a partial header internally where our callbacks cannot see it.
                self._raw += len(data)
                if self._in_head:
                    if self._raw > self._limits.max_header_bytes:
                        self._fail(431, "request header too large")
                        return
                elif self._raw > self._raw_body_limit:
                    self._fail(413, "request body too large")
                    return
            current = self._current
            if current is not None and current.expect_continue:
                self._maybe_continue()

    def pause_writing(self) -> None:
        # Answers pile up: read and start nothing more until the client takes them,
        # and drop a client that takes none (its output would be held forever).
        self._write_paused = True
        if self._streaming is not None:
            self._streaming.stream.pause()
        self._update_reading()
        self._watch_writes()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._write_timer is not None and not self._closed:
            self._write_timer.cancel()
            self._write_timer = None
        if self._streaming is not None:
            self._streaming.stream.resume()
        self._start_waiting()
        self._flush()

    # -- httptools callbacks ---------------------------------------------------------

    def _reject(self, status: int, message: str) -> NoReturn:
        self._abort = (status, message)
        raise _Abort

    def on_message_begin(self) -> None:
        if self._stopped:
            # Bytes after the connection's last request (llhttp cannot know that a
            # request with Upgrade ends it): stop the parser, _parse_error ignores it.
            raise _Abort
        self._in_message = True
        self._in_head = True
        self._began = True
        self._raw = 0
        self._reset_message()
        self._set_deadline(_HEAD, self._limits.header_timeout)

    def on_url(self, url: bytes) -> None:
        if url == b"*" and not self._url and self._parser.get_method() == b"PRI":
            self._reject(505, "HTTP/2 is not supported")
        self._url += url
        self._head_size += len(url)
        if self._head_size > self._limits.max_header_bytes:
            self._reject(431, "request header too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self._limits
        self._nheaders += 1
        self._head_size += len(name) + len(value) + 4
        if self._nheaders > limits.max_headers:
            self._reject(431, "too many request headers")
        if self._head_size > limits.max_header_bytes:
            self._reject(431, "request header too large")
        if not self._in_head:
            return  # a chunked trailer: counted against the limits, not passed on
        key = name.decode("latin-1").lower()
        val = value.decode("latin-1")
        if val and val[-1] in " \t":
            val = val.rstrip(" \t")  # llhttp strips leading OWS only
        if key == "content-length":
            self._content_length = int(val)  # llhttp has already validated the digits
        elif key == "transfer-encoding":
            self._chunked = True  # llhttp rejects any request coding that does not end in chunked
        elif key == "host":
            self._hosts += 1
            valid = _HOST_CACHE.get(val)
            if valid is None:
                valid = val.isascii() and not val.translate(_NOT_HOST)
                if len(_HOST_CACHE) < _CACHE_MAX:
                    _HOST_CACHE[val] = valid
            if not valid:
                self._reject(400, "invalid Host header")
        elif key == "expect":
            self._expect = val
        elif key == "upgrade":
            self._upgrade = True
        self._headers.append((key, val))

    def on_headers_complete(self) -> None:
        self._in_head = False
        limits = self._limits
        parser = self._parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._reject(505, "HTTP version not supported")
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("ascii")
        if method == "CONNECT":
            self._reject(501, "CONNECT is not supported")
        # + request line framing: two spaces, "HTTP/1.x", two CRLFs
        if self._head_size + len(method) + 14 > limits.max_header_bytes:
            self._reject(431, "request header too large")
        if self._hosts > 1:
            self._reject(400, "more than one Host header")
        has_body = self._chunked or self._content_length > 0
        if has_body and parser.should_upgrade():
            self._reject(501, "protocol upgrade with a request body is not supported")
        if self._content_length > limits.max_body_bytes:
            self._reject(413, "request body too large")
        expect_continue = False
        if self._expect is not None and version == "1.1":
            if self._expect.lower() != "100-continue":
                self._reject(417, "only Expect: 100-continue is supported")
            expect_continue = has_body

        target = self._url.decode("latin-1")
        if target[0] == "/":
            path, _, query = target.partition("?")
            if "#" in target:
                path = path.partition("#")[0]
                query = query.partition("#")[0]
        else:
            path, query = self._other_form_target(method, target)

        keep_alive = parser.should_keep_alive()
        if self._chunked and version == "1.0":
            keep_alive = False  # RFC 9112 6.1: framing of a 1.0 message with TE is suspect
        if self._upgrade:
            # We upgrade to nothing, but a proxy in front may believe we did and relay
            # the client's next bytes as an opaque stream: they must never be served
            # as requests, so this one is the connection's last.
            keep_alive = False
        request = Request(
            method,
            target,
            path,
            query,
            self._headers,
            b"",
            version,
            self.client,
            self.server,
            keep_alive,
        )
        ex = _Exchange(request, keep_alive, method == "HEAD")
        self._current = ex
        self._queue.append(ex)
        if expect_continue:
            # The body timer starts when we send 100 Continue: the client waits for it.
            ex.expect_continue = True
            self._deadline_kind = _NO_DEADLINE
        elif has_body:
            self._set_deadline(_BODY, limits.body_timeout)
        else:
            self._deadline_kind = _NO_DEADLINE

    def _other_form_target(self, method: str, target: str) -> tuple[str, str]:
        """Path and query of an asterisk-form or absolute-form target."""
        if target == "*":
            if method != "OPTIONS":
                self._reject(400, "'*' is only a valid target for OPTIONS")
            return "*", ""
        try:
            url = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:
            self._reject(400, "invalid request target")
        if url.schema not in (b"http", b"https") or not url.host:
            self._reject(400, "invalid request target")
        host = url.host.decode("latin-1")
        if ":" in host:
            host = f"[{host}]"
        if url.port is not None:
            host = f"{host}:{url.port}"
        # RFC 7230 5.4: the target's authority wins over any Host header.
        headers = self._headers
        for i, (key, _) in enumerate(headers):
            if key == "host":
                headers[i] = ("host", host)
                break
        else:
            headers.append(("host", host))
        path = url.path.decode("latin-1") if url.path else "/"
        query = url.query.decode("latin-1") if url.query else ""
        return path, query

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._limits.max_body_bytes:
            self._reject(413, "request body too large")
        if self._body is None:
            self._body = [body]
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        ex = self._current
        if ex is None:
            return
        self._current = None
        if self._deadline_kind != _NO_DEADLINE:
            self._deadline_kind = _NO_DEADLINE
        body = self._body
        if body is not None:
            assert ex.request is not None
            ex.request.body = body[0] if len(body) == 1 else b"".join(body)
        if not ex.keep_alive:
            self._stopped = True
        # At most max_pipeline handlers per connection have an answer not yet written,
        # and none start while the client is not taking answers: the rest wait.
        if self._active < self._limits.max_pipeline and not self._write_paused:
            if self._waiting:
                self._waiting.append(ex)
                self._start_waiting()
            else:
                self._start(ex)
        else:
            self._waiting.append(ex)
        if len(self._queue) >= self._limits.max_pipeline:
            self._update_reading()

    # -- handlers --------------------------------------------------------------------

    def _start_waiting(self) -> None:
        waiting = self._waiting
        while waiting and self._active < self._limits.max_pipeline and not self._write_paused:
            self._start(waiting.popleft())

    def _start(self, ex: _Exchange) -> None:
        assert ex.request is not None
        self._active += 1
        ex.started = True
        try:
            awaitable = self._handler(ex.request)
            if isinstance(awaitable, asyncio.Future):
                task: asyncio.Future[Response] = awaitable  # no task needed to wait on it
            elif asyncio.iscoroutine(awaitable):
                task = self._loop.create_task(awaitable)
            else:
                task = asyncio.ensure_future(awaitable, loop=self._loop)
        except Exception:
            logger.exception("handler failed to start")
            ex.response = error_response(500, "internal error")
            if self._queue and self._queue[0] is ex:
                self._flush()
            return
        ex.task = task
        task.add_done_callback(partial(self._handler_done, ex))

    def _handler_done(self, ex: _Exchange, task: asyncio.Future[Response]) -> None:
        if self._closed:
            # The client went away; only mark the outcome as retrieved.
            if not task.cancelled():
                if task.exception() is not None:
                    logger.debug(
                        "handler failed after client disconnect", exc_info=task.exception()
                    )
                elif isinstance(late := task.result(), Response) and late.stream is not None:
                    late.stream.cancel()
            return
        if task.cancelled():
            response = error_response(503, "request cancelled")
        elif (exc := task.exception()) is not None:
            request = ex.request
            logger.error(
                "handler raised for %s %s",
                request.method if request else "?",
                request.path if request else "?",
                exc_info=exc,
            )
            response = error_response(500, "internal error")
        else:
            response = task.result()
            if not isinstance(response, Response) or not isinstance(
                response.body, (bytes, bytearray, memoryview)
            ):
                logger.error("handler returned %r, not a Response with a bytes body", response)
                response = error_response(500, "internal error")
        ex.response = response
        ex.task = None
        if self._queue and self._queue[0] is ex:
            self._flush()

    # -- writing ---------------------------------------------------------------------

    def _flush(self) -> None:
        """Write every finished response at the head of the queue, in request order."""
        if self._flushing:
            return  # re-entered from a handler that failed to start: the loop below sees it
        self._flushing = True
        queue = self._queue
        started: _StreamWriter | None = None
        try:
            while queue and not self._write_paused and not self._closed:
                ex = queue[0]
                response = ex.response
                if response is None or self._streaming is not None:
                    break
                keep_alive = self._send(ex, response)
                if self._streaming is not None:
                    # It stays at the front, and what is behind it waits, until its end.
                    ex.keep_alive = keep_alive
                    started = self._streaming
                    break
                queue.popleft()
                if ex.started:
                    self._active -= 1
                if not keep_alive:
                    self._close_after_response()
                    return
                self._start_waiting()
        finally:
            self._flushing = False
        if self._closed:
            return
        if started is not None:
            started.stream.attach(started)
            if self._write_paused and self._streaming is started:
                started.stream.pause()
            self._update_reading()
            return
        if queue:
            head = queue[0]
            if head.expect_continue and head is self._current:
                self._maybe_continue()
        elif not self._in_message and not self._stopped:
            self._set_deadline(_IDLE, self._limits.keep_alive_timeout)
        self._update_reading()

    def _send(self, ex: _Exchange, response: Response) -> bool:
        request = ex.request
        http10 = request is not None and request.http_version == "1.0"
        try:
            parts, body, keep_alive = _render(
                response, ex.head_only, ex.keep_alive, http10, self._server_line
            )
        except _InvalidResponse as exc:
            logger.debug("replacing response with 502: %s", exc)
            if response.stream is not None:
                response.stream.cancel()
            parts, body, keep_alive = _render(
                error_response(502, str(exc)),
                ex.head_only,
                ex.keep_alive,
                http10,
                self._server_line,
            )
        else:
            if response.stream is not None:
                status = response.status
                discard = ex.head_only or status in _NO_BODY_STATUSES
                self._streaming = _StreamWriter(
                    self, ex, response.stream, chunked=not http10 and not discard, discard=discard
                )
        transport = self._transport
        if len(body) <= _LARGE_BODY:
            parts.append(body)
            transport.write(b"".join(parts))
        else:
            transport.write(b"".join(parts))
            transport.write(body)
        return keep_alive

    def _stream_ended(self, writer: _StreamWriter, failure: str) -> None:
        """The streaming response at the front is done (``failure``: cut off, say why)."""
        if self._streaming is not writer:
            return
        self._streaming = None
        if self._closed:
            return
        ex = writer.ex
        if failure:
            # The head promised a body that will not come whole: only dropping the
            # connection tells the client (and any proxy) it is incomplete.
            logger.info("cutting off a streamed response to %s: %s", self.client[0], failure)
            self.abort()
            return
        if writer.chunked:
            self._transport.write(_LAST_CHUNK)
        self._queue.popleft()
        if ex.started:
            self._active -= 1
        if not ex.keep_alive:
            self._close_after_response()
            return
        self._start_waiting()
        self._flush()

    def _maybe_continue(self) -> None:
        ex = self._current
        if ex is None or not ex.expect_continue or not self._queue or self._queue[0] is not ex:
            return
        ex.expect_continue = False
        if not self._closed:
            self._transport.write(_CONTINUE)
            self._set_deadline(_BODY, self._limits.body_timeout)

    def _close_after_response(self) -> None:
        """The last response is written: half-close, drain briefly, then close."""
        self._stopped = True
        self._in_message = False
        self._cancel_queued()  # requests pipelined after a closing response
        self._waiting.clear()
        self._unparsed = b""
        self._current = None
        transport = self._transport
        if self._eof:
            self._close()  # the client sends no more: nothing to linger for
            return
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        # Closing with unread input makes the kernel send RST, which can destroy the
        # response before the client reads it; so we send FIN and keep discarding
        # input until the client closes or the linger time runs out.
        if transport.can_write_eof():
            transport.write_eof()
            self._set_deadline(_LINGERING, _LINGER)
        else:
            self._close()

    def _cancel_queued(self) -> None:
        """Nothing more is written: stop the handlers and streams still owed to the queue."""
        writer, self._streaming = self._streaming, None
        if writer is not None and not writer.done:
            writer.done = True
            writer.stream.cancel()
        for ex in self._queue:
            if ex.task is not None and not ex.task.done():
                ex.task.cancel()
            elif (
                ex.response is not None
                and ex.response.stream is not None
                and (writer is None or ex is not writer.ex)
            ):
                ex.response.stream.cancel()
        self._queue.clear()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._transport.close()
            # close() waits for the output to drain, however long the client takes.
            if self._transport.get_write_buffer_size():
                self._watch_writes()

    def _watch_writes(self) -> None:
        """Drop the connection if the client takes none of its output for write_timeout."""
        if self._write_timer is None:
            self._write_mark = self._transport.get_write_buffer_size()
            self._write_timer = self._loop.call_later(
                self._limits.write_timeout, self._on_write_timer
            )

    def _on_write_timer(self) -> None:
        self._write_timer = None
        pending = self._transport.get_write_buffer_size()
        if not pending or not (self._write_paused or self._closed):
            return
        if pending < self._write_mark:  # slow, but reading: a slow client is served
            self._watch_writes()
            return
        logger.info(
            "dropping connection from %s: it took none of %d bytes of answers for %g s",
            self.client[0] or "unix socket",
            pending,
            self._limits.write_timeout,
        )
        self.abort()

    # -- flow control ----------------------------------------------------------------

    def _update_reading(self) -> None:
        if self._closed:
            return
        limit = self._limits.max_pipeline
        if (
            self._unparsed
            and not self._feeding
            and not self._write_paused
            and len(self._queue) < limit
        ):
            data, self._unparsed = self._unparsed, b""
            self._feed(data)
            if self._closed:
                return
            if self._eof and not self._unparsed and not self._stopped:
                self._end_of_input()
                return
        if self._eof:
            return  # the transport reads no more; pausing or resuming would re-read the EOF
        pause = self._write_paused or len(self._queue) >= limit or bool(self._unparsed)
        if pause == self._read_paused:
            return
        self._read_paused = pause
        if pause:
            self._transport.pause_reading()
            # The client is not the slow one while we are not reading: suspend its clock.
            if self._deadline_kind in (_HEAD, _BODY):
                self._deadline_kind = _NO_DEADLINE
        else:
            self._transport.resume_reading()
            if self._in_message:
                if self._in_head:
                    self._set_deadline(_HEAD, self._limits.header_timeout)
                elif self._current is not None and not self._current.expect_continue:
                    self._set_deadline(_BODY, self._limits.body_timeout)

    # -- errors ----------------------------------------------------------------------

    def _parse_error(self, exc: httptools.HttpParserError) -> None:
        if self._stopped:
            return  # bytes after a request that closes the connection: ignored
        abort, self._abort = self._abort, None
        if abort is not None:
            status, message = abort
        elif isinstance(exc, httptools.HttpParserCallbackError):
            logger.error("ingress parser callback failed", exc_info=exc.__context__ or exc)
            status, message = 500, "internal error"
        elif isinstance(exc, httptools.HttpParserInvalidMethodError):
            status, message = 400, "invalid or unknown method"
        elif isinstance(exc, httptools.HttpParserInvalidURLError):
            status, message = 400, "invalid request target"
        else:
            status, message = 400, f"malformed request: {exc}"
        self._fail(status, message)

    def _fail(self, status: int, message: str) -> None:
        """Answer ``status`` after the responses already owed, then close."""
        if self._stopped or self._closed:
            return
        self._stopped = True
        self._in_message = False
        self._deadline_kind = _NO_DEADLINE
        ex = self._current
        self._current = None
        if ex is None:
            ex = _Exchange(None, False, False)
            self._queue.append(ex)
        ex.keep_alive = False
        ex.expect_continue = False
        ex.response = error_response(status, message)
        self._flush()

    # -- timers ----------------------------------------------------------------------

    def _set_deadline(self, kind: int, timeout: float) -> None:
        # One timer per connection, re-armed lazily: a later deadline reuses the
        # armed timer, which re-checks when it fires, so a busy keep-alive
        # connection creates a timer every few seconds rather than per request.
        deadline = self._loop.time() + timeout
        self._deadline = deadline
        self._deadline_kind = kind
        if self._timer is None or self._timer_when > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_when = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        kind = self._deadline_kind
        if kind == _NO_DEADLINE or self._closed:
            return
        if self._loop.time() < self._deadline:
            self._timer_when = self._deadline
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
            return
        if kind == _HEAD:
            self._fail(408, "request header timeout")
        elif kind == _BODY:
            self._fail(408, "request body timeout")
        else:
            self._deadline_kind = _NO_DEADLINE
            # A client still reading a large response is slow, not idle.
            pending = self._transport.get_write_buffer_size()
            if pending and pending != self._last_buffer_size:
                self._last_buffer_size = pending
                timeout = self._limits.keep_alive_timeout if kind == _IDLE else _LINGER
                self._set_deadline(kind, timeout)
            elif pending:
                self._closed = True
                self._transport.abort()
            else:
                self._close()

    # -- lifecycle -------------------------------------------------------------------

    def abort(self) -> None:
        """Drop the connection now; handlers still running are cancelled."""
        if self._transport is not None:
            self._closed = True
            self._transport.abort()

    def shutdown(self) -> None:
        """Take no more requests; answer those already received, then close."""
        if self._closed or self._stopped:
            return
        self._end_of_input()

    def _end_of_input(self) -> None:
        """Read no more: answer the requests received whole, then close."""
        self._stopped = True
        self._in_message = False
        self._deadline_kind = _NO_DEADLINE
        self._unparsed = b""
        current = self._current
        if current is not None:  # a request whose body never finished arriving
            self._current = None
            self._queue.pop()
        if self._queue:
            self._queue[-1].keep_alive = False
        else:
            self._close()
