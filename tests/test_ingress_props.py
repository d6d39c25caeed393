"""Hypothesis properties of the HTTP/1.1 ingress, against a real server on 127.0.0.1.

* round trip: whatever valid request is sent, however its bytes are split into reads,
  the handler sees exactly what was sent;
* robustness: arbitrary bytes never crash or hang the server; it answers with an
  error status or closes, within a deadline;
* pipelining: any batch of pipelined requests is answered in request order, also when
  it is far longer than the pipeline, arrives in any reads, and ends in a half-close.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hourai.ingress import HttpProtocol, Limits, Request, Response, serve

WAIT = 5.0
TIMEOUT = 0.2  # header, body and keep-alive timeouts of the server under test

PROPS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


async def handler(req: Request) -> Response:
    if req.path.startswith("/sleep/"):
        await asyncio.sleep(int(req.path.split("/")[2]) / 1000)
        return Response(200, [], req.path.encode())
    seen = {
        "method": req.method,
        "target": req.target,
        "path": req.path,
        "query": req.query,
        "headers": req.headers,
        "body": req.body.decode("latin-1"),
    }
    return Response(200, [("content-type", "application/json")], json.dumps(seen).encode())


class ErrorLog(logging.Handler):
    """Collects ERROR records of the ingress: none may appear for any client input."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Server:
    def __init__(self, max_pipeline: int = 32, timeout: float = TIMEOUT) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.connections: set[HttpProtocol] = set()
        limits = Limits(
            header_timeout=timeout,
            body_timeout=timeout,
            keep_alive_timeout=timeout,
            max_body_bytes=64 * 1024,
            max_header_bytes=8 * 1024,
            max_pipeline=max_pipeline,
        )
        coro = serve(handler, "127.0.0.1", 0, limits, connections=self.connections)
        self.server = asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)
        self.port: int = self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            for conn in list(self.connections):
                conn.abort()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(WAIT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    srv = Server()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def narrow_server() -> Iterator[Server]:
    # Timeouts that never fire here: the client sends in pieces, and on a loaded machine a
    # pause between two of them can outlast 0.2 s (the server then rightly answers 408).
    srv = Server(max_pipeline=3, timeout=WAIT)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def error_log() -> Iterator[ErrorLog]:
    log = ErrorLog()
    logger = logging.getLogger("hourai.ingress")
    logger.addHandler(log)
    yield log
    logger.removeHandler(log)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_close(sock: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes; (data, closed before deadline)."""
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return data, False
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def take_response(data: bytes) -> tuple[int, bytes, bytes] | None:
    """(status, body, rest) for the first complete response in ``data``, else None."""
    if b"\r\n\r\n" not in data:
        return None
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), lines[0]
    status = int(lines[0].split(" ")[1])
    length = 0
    for line in lines[1:]:
        name, value = line.split(":", 1)
        if name == "content-length":
            length = int(value)
    if len(rest) < length:
        return None
    return status, rest[:length], rest[length:]


def split_responses(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """(status, body) of each complete response in ``data``, and the unparsed rest."""
    out = []
    while (taken := take_response(data)) is not None:
        status, body, data = taken
        out.append((status, body))
    return out, data


class Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def response(self) -> tuple[int, bytes]:
        while (taken := take_response(self.buf)) is None:
            chunk = self.sock.recv(65536)
            assert chunk, "server closed before answering"
            self.buf += chunk
        status, body, self.buf = taken
        return status, body


def assert_healthy(server: Server) -> None:
    sock = connect(server.port)
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        status, body = Reader(sock).response()
        assert status == 200
        assert json.loads(body)["path"] == "/health"
    finally:
        sock.close()


# --- strategies -----------------------------------------------------------------------

ALPHA = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
PCHAR = ALPHA + "-._~!$&'()*+,;=:@"
TCHAR = ALPHA + "!#$%&'*+-.^_`|~"
# Names the ingress or llhttp give meaning to; drawn headers stay out of their way.
RESERVED = {"host", "content-length", "transfer-encoding", "connection", "expect", "upgrade",
            "proxy-connection", "keep-alive"}  # fmt: skip

pct = st.builds(lambda n: f"%{n:02X}", st.integers(0, 255))
segment = st.lists(st.one_of(st.sampled_from(PCHAR), pct), max_size=12).map("".join)
paths = st.lists(segment, min_size=1, max_size=5).map(lambda s: "/" + "/".join(s))
queries = st.one_of(
    st.just(""), st.lists(st.one_of(st.sampled_from(PCHAR + "/?"), pct), max_size=30).map("".join)
)
header_names = st.text(TCHAR, min_size=1, max_size=24).filter(lambda n: n.lower() not in RESERVED)
value_chars = st.sampled_from(
    [chr(c) for c in range(0x21, 0x7F)] + [chr(c) for c in range(0x80, 0x100)]
)
header_values = st.builds(
    lambda edge, middle, end: edge + middle + end if middle else edge,
    value_chars,
    st.lists(st.one_of(value_chars, st.sampled_from(" \t")), max_size=40).map("".join),
    value_chars,
) | st.just("")


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PURGE"]))
    path = draw(paths)
    query = draw(queries)
    target = path + ("?" + query if query else "")
    drawn = draw(st.lists(st.tuples(header_names, header_values), max_size=12))
    headers = [("Host", "test"), *drawn]
    body = draw(st.binary(max_size=3000))
    if draw(st.booleans()):
        headers.append(("Content-Length", str(len(body))))
        framed = body
    else:
        headers.append(("Transfer-Encoding", "chunked"))
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=5)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)
    wire = head.encode("latin-1") + b"\r\n" + framed
    expected = {
        "method": method,
        "target": target,
        "path": path,
        "query": query,
        "headers": [[n.lower(), v] for n, v in headers],
        "body": body.decode("latin-1"),
    }
    return wire, expected


@st.composite
def splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=20))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True) if a < b]


FRAGMENTS = [b"GET", b"POST", b" ", b"/", b"/x?y", b"HTTP/1.1", b"HTTP/1.0", b"\r\n", b"\r\n\r\n",
             b":", b"Host: a", b"Content-Length: ", b"Transfer-Encoding: chunked", b"0", b"5",
             b"ffffffff", b"Expect: 100-continue", b"Connection: close", b"\n", b"\x00", b"\t",
             b"Connection: Upgrade\r\nUpgrade: h2c"]  # fmt: skip

# No HEAD here: split_responses would not know that a HEAD answer has no body.
VALID = [
    b"GET /a?b=c HTTP/1.1\r\nHost: t\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
    b"PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"POST /e HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nDELETE /h HTTP/1.1\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nConnection: close\r\n\r\n",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid request stream with a few bytes inserted, deleted, replaced or cut off."""
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "replace", "truncate"]))
        if kind == "insert":
            data[at:at] = draw(
                st.one_of(st.sampled_from(FRAGMENTS), st.binary(min_size=1, max_size=4))
            )
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 4))]
        elif kind == "replace" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[at:]
    return bytes(data)


garbage = st.one_of(
    st.binary(max_size=400),
    st.binary(max_size=200).map(lambda b: b"GET / HTTP/1.1\r\n" + b),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=8)), max_size=40).map(
        b"".join
    ),
)


# --- properties -----------------------------------------------------------------------


@PROPS
@given(st.data())
def test_handler_sees_exactly_what_was_sent_however_split(
    server: Server, error_log: ErrorLog, data: st.DataObject
) -> None:
    wire, expected = data.draw(requests())
    pieces = data.draw(splits(wire))
    sock = connect(server.port)
    try:
        local = sock.getsockname()
        deadline = time.monotonic() + WAIT
        proto = None
        while proto is None:
            proto = next((c for c in list(server.connections) if c.client == local), None)
            assert time.monotonic() < deadline
            time.sleep(0.001)
        # Feed the server-side protocol the exact reads we want it to see; each piece is
        # a separate loop callback, so handler tasks may run between them.
        for piece in pieces:
            server.loop.call_soon_threadsafe(proto.data_received, piece)
        status, body = Reader(sock).response()
        assert status == 200, body
        assert json.loads(body) == expected
    finally:
        sock.close()
    assert not error_log.records


def answers_or_closes(server: Server, error_log: ErrorLog, payload: bytes) -> None:
    """Send ``payload``; the server must answer only with valid responses and then close,
    within a deadline, log no error, and keep serving other connections."""
    sock = connect(server.port)
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        received, closed = read_until_close(sock, time.monotonic() + 10 * TIMEOUT + 1)
    finally:
        sock.close()
    assert closed, f"server neither answered nor closed: got {received!r}"
    responses, rest = split_responses(received)
    assert rest == b""
    event(f"statuses {sorted({status for status, _ in responses})}")
    for status, _ in responses:
        # 100 is the interim answer to Expect: 100-continue; 200 a valid request that
        # happened to be among the bytes; everything else must be an error status.
        assert status in (100, 200) or 400 <= status < 600
    assert not error_log.records
    assert_healthy(server)


@PROPS
@given(garbage)
def test_arbitrary_bytes_never_crash_or_hang(
    server: Server, error_log: ErrorLog, payload: bytes
) -> None:
    answers_or_closes(server, error_log, payload)


@PROPS
@given(mutated())
def test_damaged_requests_never_crash_or_hang(
    server: Server, error_log: ErrorLog, payload: bytes
) -> None:
    answers_or_closes(server, error_log, payload)


@settings(PROPS, max_examples=40)
@given(
    st.lists(
        st.tuples(st.integers(0, 25), st.binary(max_size=200)),
        min_size=1,
        max_size=12,
    )
)
def test_pipelined_requests_are_answered_in_order(
    server: Server, batch: list[tuple[int, bytes]]
) -> None:
    wire = b"".join(
        b"POST /sleep/%d/%d HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
        % (delay, i, len(body), body)
        for i, (delay, body) in enumerate(batch)
    )
    sock = connect(server.port)
    try:
        sock.sendall(wire)
        reader = Reader(sock)
        answers = [reader.response() for _ in batch]
    finally:
        sock.close()
    assert answers == [(200, b"/sleep/%d/%d" % (d, i)) for i, (d, _) in enumerate(batch)]


@settings(PROPS, max_examples=30)
@given(st.data())
def test_long_half_closed_pipelines_are_answered_in_order(
    narrow_server: Server, error_log: ErrorLog, data: st.DataObject
) -> None:
    # Hundreds of requests against a pipeline of 3: most of the input waits unparsed,
    # read by read, and the half-close arrives long before the last answer is due.
    batch = data.draw(
        st.lists(st.tuples(st.integers(0, 2), st.binary(max_size=300)), min_size=1, max_size=400)
    )
    wire = b"".join(
        b"POST /sleep/%d/%d HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
        % (delay, i, len(body), body)
        for i, (delay, body) in enumerate(batch)
    )
    sock = connect(narrow_server.port)
    try:
        for piece in data.draw(splits(wire)):
            sock.sendall(piece)
        sock.shutdown(socket.SHUT_WR)
        received, closed = read_until_close(sock, time.monotonic() + WAIT + len(batch) * 0.01)
    finally:
        sock.close()
    assert closed
    answers, rest = split_responses(received)
    assert rest == b""
    assert answers == [(200, b"/sleep/%d/%d" % (d, i)) for i, (d, _) in enumerate(batch)]
    assert not error_log.records
