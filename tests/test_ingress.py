"""The HTTP/1.1 ingress over real sockets, under both the default loop and uvloop.

A real server runs on 127.0.0.1:0 in a background event-loop thread; clients are raw
sockets so each test controls the exact bytes (pipelining, trickling, disconnects),
plus one http.client smoke test.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import http.client
import json
import logging
import re
import select
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
import uvloop

from hourai.ingress import HttpProtocol, Limits, Request, Response, error_response, serve

WAIT = 5.0  # deadline for anything that should happen "soon"


# --- server harness -------------------------------------------------------------------


@dataclass
class State:
    """What the test handler saw, shared with the test thread."""

    started: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    blocked: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    canned: Response | None = None
    gate: asyncio.Event | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, bucket: list[str], item: str) -> None:
        with self.lock:
            bucket.append(item)

    def count(self, bucket: list[str]) -> int:
        with self.lock:
            return len(bucket)


def request_as_json(req: Request) -> bytes:
    return json.dumps(
        {
            "method": req.method,
            "target": req.target,
            "path": req.path,
            "query": req.query,
            "headers": req.headers,
            "body": req.body.decode("latin-1"),
            "http_version": req.http_version,
            "keep_alive": req.keep_alive,
            "client": list(req.client),
            "server": list(req.server),
        }
    ).encode()


def make_handler(state: State) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    async def handler(req: Request) -> Response:
        parts = req.path.split("/")
        route = parts[1] if len(parts) > 1 else ""
        state.note(state.started, req.path)
        if route == "sleep":
            await asyncio.sleep(int(parts[2]) / 1000)
            state.note(state.finished, req.path)
            return Response(200, [("content-type", "text/plain")], req.path.encode())
        if route == "block":
            state.blocked.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                state.cancelled.set()
                raise
        if route == "gate":
            assert state.gate is not None
            await state.gate.wait()
            return Response(200, [], req.path.encode())
        if route == "raise":
            raise RuntimeError("boom from the handler")
        if route == "canned":
            assert state.canned is not None
            return state.canned
        if route == "big":
            n = int(parts[2])
            pattern = bytes(range(256))
            return Response(200, [], (pattern * (n // 256 + 1))[:n])
        if route == "status":
            return Response(int(parts[2]), [], b"some body")
        return Response(200, [("content-type", "application/json")], request_as_json(req))

    return handler


class ServerThread:
    """serve() on its own event loop in a daemon thread."""

    def __init__(self, loop_kind: str, limits: Limits) -> None:
        self.state = State()
        self.loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.connections: set[HttpProtocol] = set()

        async def start() -> asyncio.AbstractServer:
            self.state.gate = asyncio.Event()
            return await serve(
                make_handler(self.state),
                "127.0.0.1",
                0,
                limits,
                connections=self.connections,
            )

        self.server = self.call(start())
        self.port: int = self.server.sockets[0].getsockname()[1]

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def run(self, fn: Callable[[], Any]) -> Any:
        async def wrapper() -> Any:
            return fn()

        return self.call(wrapper())

    def open_gate(self) -> None:
        assert self.state.gate is not None
        self.loop.call_soon_threadsafe(self.state.gate.set)

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            for conn in list(self.connections):
                conn.abort()
            await asyncio.sleep(0)
            current = asyncio.current_task()
            for task in asyncio.all_tasks():
                if task is not current:
                    task.cancel()

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


@pytest.fixture(params=["asyncio", "uvloop"])
def make_server(request: pytest.FixtureRequest) -> Iterator[Callable[..., ServerThread]]:
    servers: list[ServerThread] = []

    def factory(**limits: Any) -> ServerThread:
        srv = ServerThread(request.param, Limits(**limits))
        servers.append(srv)
        return srv

    yield factory
    for srv in servers:
        srv.close()


@pytest.fixture
def server(make_server: Callable[..., ServerThread]) -> ServerThread:
    return make_server()


# --- client helpers -------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise EOFError(f"connection closed; unread: {self.buf!r}")
        self.buf += chunk

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_response(self, head_request: bool = False) -> Reply:
        while b"\r\n\r\n" not in self.buf:
            self.fill()
        raw_head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = raw_head.decode("latin-1").split("\r\n")
        version, status, _ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1"
        headers = []
        for line in lines[1:]:
            name, value = line.split(":", 1)
            assert name == name.lower()
            headers.append((name, value.strip()))
        code = int(status)
        lengths = [v for k, v in headers if k == "content-length"]
        assert len(lengths) <= 1
        if head_request or code < 200 or code in (204, 304):
            body = b""
        else:
            assert lengths, f"no content-length in {raw_head!r}"
            body = self.read_exact(int(lengths[0]))
        return Reply(code, headers, body, raw_head)

    def closed(self, timeout: float = WAIT) -> bool:
        """True when the server closes the connection (EOF) before ``timeout``,
        with no further bytes; False when it stays open."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return not self.buf
                self.buf += chunk
        except TimeoutError:
            return False
        except ConnectionResetError:
            return not self.buf
        finally:
            self.sock.settimeout(WAIT)

    def close(self) -> None:
        self.sock.close()


def get(path: str, *headers: str, version: str = "1.1", method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: test", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def wait_for(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.005)


@pytest.fixture
def client(server: ServerThread) -> Iterator[Client]:
    c = Client(server.port)
    yield c
    c.close()


# --- keep-alive and connection management ---------------------------------------------


def test_http11_keeps_the_connection_open(server: ServerThread, client: Client) -> None:
    for i in range(3):
        client.send(get(f"/echo?i={i}"))
        reply = client.read_response()
        assert reply.status == 200
        assert reply.header("connection") is None
        assert reply.json()["query"] == f"i={i}"
    assert reply.json()["keep_alive"] is True
    assert not client.closed(timeout=0.1)


def test_http10_closes_by_default(client: Client) -> None:
    client.send(get("/echo", version="1.0"))
    reply = client.read_response()
    assert reply.status == 200
    assert reply.header("connection") == "close"
    assert reply.json()["http_version"] == "1.0"
    assert reply.json()["keep_alive"] is False
    assert client.closed()


def test_http10_keep_alive_on_request(client: Client) -> None:
    client.send(get("/echo", "Connection: keep-alive", version="1.0"))
    reply = client.read_response()
    assert reply.header("connection") == "keep-alive"
    client.send(get("/echo?again", "Connection: keep-alive", version="1.0"))
    assert client.read_response().json()["query"] == "again"


def test_connection_close_from_client(client: Client) -> None:
    client.send(get("/echo", "Connection: close"))
    reply = client.read_response()
    assert reply.status == 200
    assert reply.header("connection") == "close"
    assert client.closed()


def test_handler_connection_close_closes_after_response(
    server: ServerThread, client: Client
) -> None:
    server.state.canned = Response(200, [("Connection", "close")], b"bye")
    client.send(get("/canned") + get("/echo"))
    reply = client.read_response()
    assert reply.body == b"bye"
    assert reply.all("connection") == ["close"]
    assert client.closed()


def test_idle_keep_alive_connection_is_closed(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server(keep_alive_timeout=0.3)
    c = Client(srv.port)
    c.send(get("/echo"))
    assert c.read_response().status == 200
    start = time.monotonic()
    assert c.closed(timeout=WAIT)
    assert 0.2 <= time.monotonic() - start < 2.0
    wait_for(lambda: not srv.connections)


def test_request_fields(server: ServerThread, client: Client) -> None:
    client.send(
        b"PUT /fn/a%20b?x=1&y=%2F HTTP/1.1\r\nHost: test\r\nX-Mixed-Case: Value  \r\n"
        b"x-dup: 1\r\nX-Dup: 2\r\nContent-Length: 3\r\n\r\nabc"
    )
    seen = client.read_response().json()
    assert seen["method"] == "PUT"
    assert seen["target"] == "/fn/a%20b?x=1&y=%2F"
    assert seen["path"] == "/fn/a%20b"
    assert seen["query"] == "x=1&y=%2F"
    assert seen["headers"] == [
        ["host", "test"],
        ["x-mixed-case", "Value"],
        ["x-dup", "1"],
        ["x-dup", "2"],
        ["content-length", "3"],
    ]
    assert seen["body"] == "abc"
    assert seen["client"] == list(client.sock.getsockname())
    assert seen["server"] == ["127.0.0.1", server.port]


def test_request_header_lookup() -> None:
    req = Request("GET", "/", "/", "", [("a", "1"), ("b", "2"), ("a", "3")], b"", "1.1",
                  ("", 0), ("", 0), True)  # fmt: skip
    assert req.header("A") == "1"
    assert req.header("c") is None


# --- pipelining -----------------------------------------------------------------------


def test_pipelined_requests_answered_in_order(server: ServerThread, client: Client) -> None:
    client.send(get("/sleep/300") + get("/sleep/0") + get("/echo?third"))
    assert client.read_response().body == b"/sleep/300"
    assert client.read_response().body == b"/sleep/0"
    assert client.read_response().json()["query"] == "third"
    # the second handler really did finish first: order comes from the ingress
    assert server.state.finished == ["/sleep/0", "/sleep/300"]


def test_pipeline_limit_bounds_concurrent_handlers(
    make_server: Callable[..., ServerThread],
) -> None:
    srv = make_server(max_pipeline=2)
    c = Client(srv.port)
    c.send(b"".join(get(f"/gate/{i}") for i in range(6)))
    wait_for(lambda: srv.state.count(srv.state.started) == 2)
    time.sleep(0.2)  # a bounded window in which no third handler may start
    assert srv.state.count(srv.state.started) == 2
    srv.open_gate()
    assert [c.read_response().body for _ in range(6)] == [f"/gate/{i}".encode() for i in range(6)]
    c.send(get("/echo"))
    assert c.read_response().status == 200


def test_pipeline_far_longer_than_the_limit_is_answered_in_order(
    make_server: Callable[..., ServerThread],
) -> None:
    srv = make_server(max_pipeline=2)
    c = Client(srv.port)
    n = 400  # in one send, far more than one parse step: most of it waits unparsed
    c.send(b"".join(get(f"/sleep/0/{i}") for i in range(n)))
    assert [c.read_response().body for _ in range(n)] == [b"/sleep/0/%d" % i for i in range(n)]
    c.send(get("/echo"))
    assert c.read_response().status == 200


def test_pipelined_error_comes_after_earlier_answers(client: Client) -> None:
    client.send(get("/sleep/100") + b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    assert client.read_response().body == b"/sleep/100"
    reply = client.read_response()
    assert reply.status == 400
    assert reply.header("connection") == "close"
    assert client.closed()


def test_write_backpressure_pauses_reading(server: ServerThread, client: Client) -> None:
    size = 32 * 1024 * 1024
    client.send(get(f"/big/{size}"))
    while b"\r\n\r\n" not in client.buf:  # the response is being written
        client.fill()
    # The client reads no more: the response backs up, the server stops reading,
    # and a request sent now is not even parsed.
    client.send(get("/echo?after"))
    time.sleep(0.3)
    assert server.state.count(server.state.started) == 1
    big = client.read_response()
    assert len(big.body) == size
    assert big.body[:512] == bytes(range(256)) * 2
    assert client.read_response().json()["query"] == "after"


def test_client_that_stops_reading_is_dropped(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server(write_timeout=0.3)
    c = Client(srv.port)
    size = 32 * 1024 * 1024
    c.send(get(f"/big/{size}") + get(f"/big/{size}"))
    wait_for(lambda: srv.state.count(srv.state.started) == 2)
    wait_for(lambda: not srv.connections)  # aborted for making no progress
    with pytest.raises((EOFError, ConnectionResetError)):
        while True:
            c.fill()


def small_window_client(port: int) -> Client:
    """A client whose kernel buffers little of what it does not read."""
    c = Client.__new__(Client)
    c.sock = socket.socket()
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    c.sock.settimeout(WAIT)
    c.sock.connect(("127.0.0.1", port))
    c.buf = b""
    return c


def test_pipelining_client_that_never_reads_is_bounded_then_dropped(
    make_server: Callable[..., ServerThread],
) -> None:
    srv = make_server(write_timeout=0.5)
    c = Client(srv.port)
    wire = b"".join(get(f"/big/1024?{i:05}") for i in range(20000))
    c.sock.setblocking(False)
    sent = 0
    with contextlib.suppress(BlockingIOError):  # until the server stops reading
        while sent < len(wire):
            sent += c.sock.send(wire[sent : sent + 65536])
    requests = sent // len(get("/big/1024?00000"))
    wait_for(lambda: srv.state.count(srv.state.started) > 0)
    # Dropped once its answers have sat unread for the write timeout...
    wait_for(lambda: not srv.connections, timeout=WAIT + 5)
    # ...and only the answers that fit the buffers and the pipeline were made: without
    # the bounds, the kernel alone takes some 4000 of them (4 MiB), and the rest wait.
    started = srv.state.count(srv.state.started)
    assert 0 < started <= 1000 < requests
    c.sock.setblocking(True)
    with pytest.raises((EOFError, ConnectionResetError)):
        for _ in range(requests):
            c.read_response()


def test_slow_reader_is_served_past_the_write_timeout(
    make_server: Callable[..., ServerThread],
) -> None:
    srv = make_server(write_timeout=1.0)
    c = small_window_client(srv.port)
    size = 16 * 1024 * 1024
    c.send(get(f"/big/{size}"))
    start = time.monotonic()
    # At most 16 KiB per 2 ms: two seconds or more of a backed-up answer, while the
    # kernel's send buffer (a few MiB) frees room for more well within the timeout.
    while len(c.buf) < size:
        chunk = c.sock.recv(16 * 1024)
        assert chunk, "dropped while reading"
        c.buf += chunk
        time.sleep(0.002)
    assert time.monotonic() - start > 1.0
    reply = c.read_response()
    assert len(reply.body) == size
    c.send(get("/echo?after"))
    assert c.read_response().json()["query"] == "after"


# --- half-closing clients -------------------------------------------------------------


def test_half_closed_client_gets_every_answer_then_eof(server: ServerThread) -> None:
    c = Client(server.port)
    c.send(get("/sleep/200") + get("/echo?2"))
    c.sock.shutdown(socket.SHUT_WR)
    first = c.read_response()
    assert first.body == b"/sleep/200"
    assert first.header("connection") is None
    last = c.read_response()
    assert last.json()["query"] == "2"
    assert last.header("connection") == "close"
    assert c.closed()
    assert server.state.finished == ["/sleep/200"]  # not cancelled by the FIN
    wait_for(lambda: not server.connections)


def test_half_close_mid_request_answers_only_the_whole_ones(server: ServerThread) -> None:
    c = Client(server.port)
    c.send(get("/echo?1") + b"GET /echo?2 HTTP/1.1\r\nHo")
    c.sock.shutdown(socket.SHUT_WR)
    assert c.read_response().json()["query"] == "1"
    assert c.closed()
    assert server.state.started == ["/echo"]


def test_half_close_with_more_queued_than_the_pipeline(
    make_server: Callable[..., ServerThread],
) -> None:
    srv = make_server(max_pipeline=2)
    c = Client(srv.port)
    n = 400  # far more than one parse step: most of it waits unparsed for a slot
    c.send(b"".join(get(f"/sleep/0?{i}") for i in range(n)))
    c.sock.shutdown(socket.SHUT_WR)
    for _ in range(n):
        assert c.read_response().status == 200
    assert c.closed()
    assert srv.state.count(srv.state.finished) == n


# --- request bodies -------------------------------------------------------------------


def test_content_length_body(client: Client) -> None:
    body = bytes(range(256)) * 40
    client.send(get("/echo", f"Content-Length: {len(body)}", method="POST")[:-2])
    client.send(b"\r\n" + body[:1000])
    client.send(body[1000:])
    assert client.read_response().json()["body"].encode("latin-1") == body


def test_chunked_body(client: Client) -> None:
    client.send(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    client.send(b"5\r\nhello\r\n")
    client.send(b"1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\nX-Trailer: dropped\r\n\r\n")
    seen = client.read_response().json()
    assert seen["body"] == "hello world!"
    assert ["x-trailer", "dropped"] not in seen["headers"]
    client.send(get("/echo?next"))
    assert client.read_response().json()["query"] == "next"


def test_content_length_and_chunked_is_400(client: Client) -> None:
    client.send(
        b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    assert client.read_response().status == 400
    assert client.closed()


def test_body_over_limit_by_content_length(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server(max_body_bytes=1000)
    c = Client(srv.port)
    c.send(get("/echo", "Content-Length: 5000000", method="POST"))  # head only
    reply = c.read_response()
    assert reply.status == 413
    assert reply.header("connection") == "close"
    assert c.closed()
    assert srv.state.started == []


def test_body_over_limit_while_chunked(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server(max_body_bytes=1000)
    c = Client(srv.port)
    c.send(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    c.send(b"258\r\n" + b"a" * 600 + b"\r\n")
    c.send(b"258\r\n" + b"a" * 600 + b"\r\n")
    assert c.read_response().status == 413
    assert c.closed()
    assert srv.state.started == []


def test_body_at_limit_is_accepted(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server(max_body_bytes=1000)
    c = Client(srv.port)
    c.send(get("/echo", "Content-Length: 1000", method="POST") + b"b" * 1000)
    assert c.read_response().json()["body"] == "b" * 1000


def test_expect_100_continue(client: Client) -> None:
    client.send(get("/echo", "Expect: 100-continue", "Content-Length: 5", method="POST"))
    interim = client.read_exact(len(b"HTTP/1.1 100 Continue\r\n\r\n"))
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    client.send(b"hello")
    assert client.read_response().json()["body"] == "hello"


def test_expect_100_continue_rejected_body_gets_no_interim(
    make_server: Callable[..., ServerThread],
) -> None:
    srv = make_server(max_body_bytes=10)
    c = Client(srv.port)
    c.send(get("/echo", "Expect: 100-continue", "Content-Length: 50", method="POST"))
    assert c.read_response().status == 413


def test_other_expectation_is_417(client: Client) -> None:
    client.send(get("/echo", "Expect: something-else", "Content-Length: 5", method="POST"))
    assert client.read_response().status == 417
    assert client.closed()


# --- response framing -----------------------------------------------------------------

IMF_FIXDATE = re.compile(
    r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
    r"\d{4} \d\d:\d\d:\d\d GMT"
)


def test_framing_headers_are_the_ingress_own(server: ServerThread, client: Client) -> None:
    server.state.canned = Response(
        200,
        [("Content-Length", "999"), ("Transfer-Encoding", "chunked"), ("X-Kept", "yes")],
        b"hello",
    )
    client.send(get("/canned"))
    reply = client.read_response()
    assert reply.body == b"hello"
    assert reply.all("content-length") == ["5"]
    assert reply.header("transfer-encoding") is None
    assert reply.header("x-kept") == "yes"
    assert reply.header("server") == "hourai"
    date = reply.header("date")
    assert date is not None and IMF_FIXDATE.fullmatch(date)
    assert abs(parsedate_to_datetime(date).timestamp() - time.time()) < 5
    client.send(get("/echo"))  # framing intact: the next response parses
    assert client.read_response().status == 200


def test_server_name_and_handler_date(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server(server_name="edge")
    srv.state.canned = Response(200, [("Date", "Thu, 01 Jan 1970 00:00:00 GMT")], b"")
    c = Client(srv.port)
    c.send(get("/canned"))
    reply = c.read_response()
    assert reply.all("date") == ["Thu, 01 Jan 1970 00:00:00 GMT"]
    assert reply.header("server") == "edge"
    assert reply.header("content-length") == "0"


def test_head_has_length_but_no_body(client: Client) -> None:
    client.send(get("/big/1000", method="HEAD"))
    reply = client.read_response(head_request=True)
    assert reply.header("content-length") == "1000"
    client.send(get("/echo?after-head"))
    assert client.read_response().json()["query"] == "after-head"


def test_head_keeps_handler_stated_length(server: ServerThread, client: Client) -> None:
    server.state.canned = Response(200, [("content-length", "12345")], b"")
    client.send(get("/canned", method="HEAD"))
    assert client.read_response(head_request=True).header("content-length") == "12345"


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(server: ServerThread, client: Client, status: int) -> None:
    client.send(get(f"/status/{status}"))
    reply = client.read_response()
    assert reply.status == status
    assert reply.header("content-length") is None
    client.send(get("/echo?next"))  # the dropped body did not leak onto the wire
    assert client.read_response().json()["query"] == "next"


@pytest.mark.parametrize("status", [100, 101, 199, 600, 99])
def test_invalid_handler_status_is_502(client: Client, status: int) -> None:
    client.send(get(f"/status/{status}"))
    assert client.read_response().status == 502


def test_large_response_is_intact(client: Client) -> None:
    size = 3 * 1024 * 1024 + 7
    client.send(get(f"/big/{size}"))
    reply = client.read_response()
    assert len(reply.body) == size
    assert reply.body == (bytes(range(256)) * (size // 256 + 1))[:size]


@pytest.mark.parametrize(
    "header",
    [
        ("x-a\r\nx-injected", "v"),
        ("x-a", "v\r\nx-injected: 1"),
        ("x-a", "v\nx-injected: 1"),
        ("x-a", "v\rx-injected: 1"),
        ("x-a", "v\x00"),
        ("x a", "v"),
        ("x(y)", "v"),
        ("x:y", "v"),
        ("", "v"),
        ("x-a", "日本"),
        ("x-é", "v"),
    ],
)
def test_invalid_response_header_is_502(
    server: ServerThread, client: Client, header: tuple[str, str]
) -> None:
    server.state.canned = Response(200, [("x-ok", "1"), header], b"secret")
    client.send(get("/canned"))
    reply = client.read_response()
    assert reply.status == 502
    assert reply.body == b"invalid response header from function\n"
    assert b"injected" not in reply.raw_head
    assert reply.header("x-ok") is None
    client.send(get("/echo"))
    assert client.read_response().status == 200


def test_unusual_but_valid_response_headers(server: ServerThread, client: Client) -> None:
    server.state.canned = Response(
        201, [("X-Tab", "a\tb"), ("X-Latin", "café"), ("x-!#$%&'*+-.^_`|~", "ok")], b""
    )
    client.send(get("/canned"))
    reply = client.read_response()
    assert reply.status == 201
    assert reply.header("x-tab") == "a\tb"
    assert reply.header("x-latin") == "caf\xe9"  # sent as latin-1
    assert reply.header("x-!#$%&'*+-.^_`|~") == "ok"


def test_error_response_helper() -> None:
    resp = error_response(404, "no such function", [("x-a", "b")])
    assert resp.status == 404
    assert resp.body == b"no such function\n"
    assert resp.headers == [("content-type", "text/plain; charset=utf-8"), ("x-a", "b")]


# --- malformed and unsupported requests -----------------------------------------------


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", 400),
        (b"GET / HTTP/1.1\nHost: a\n\n", 400),
        (b"GET /a b HTTP/1.1\r\n\r\n", 400),
        (b"GET foo HTTP/1.1\r\n\r\n", 400),
        (b"GET * HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a b/c\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nab", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
        (b"BREW /pot HTTP/1.1\r\n\r\n", 400),
        (b"get / HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 501),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET / HTTP/1.2\r\n\r\n", 505),
        (b"GET / HTTP/0.9\r\n\r\n", 505),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
        (
            b"POST / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
            b"Content-Length: 2\r\n\r\nab",
            501,
        ),
    ],
)
def test_bad_requests(server: ServerThread, client: Client, data: bytes, status: int) -> None:
    client.send(data)
    reply = client.read_response()
    assert reply.status == status
    assert reply.header("connection") == "close"
    assert reply.header("content-type") == "text/plain; charset=utf-8"
    assert client.closed()
    assert server.state.started == []


def test_header_too_large_is_431(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server(max_header_bytes=4096)
    c = Client(srv.port)
    c.send(get("/echo", "X-Big: " + "a" * 5000))
    assert c.read_response().status == 431
    assert c.closed()


def test_header_just_under_limit_is_accepted(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server(max_header_bytes=4096)
    c = Client(srv.port)
    c.send(get("/echo", "X-Big: " + "a" * 3900))
    assert c.read_response().status == 200


def test_too_many_headers_is_431(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server(max_headers=10)
    c = Client(srv.port)
    c.send(get("/echo", *[f"X-{i}: v" for i in range(9)]))  # + Host = 10
    assert c.read_response().status == 200
    c.send(get("/echo", *[f"X-{i}: v" for i in range(10)]))
    assert c.read_response().status == 431
    assert c.closed()


def test_endless_header_is_cut_off(make_server: Callable[..., ServerThread]) -> None:
    """A header line that never ends is refused once it passes the limit, not buffered."""
    srv = make_server(max_header_bytes=16 * 1024)
    c = Client(srv.port)
    c.send(b"GET / HTTP/1.1\r\nX-Endless: ")
    sent = 0
    while sent < 4 * 1024 * 1024:
        readable, _, _ = select.select([c.sock], [], [], 0)
        if readable:
            break
        try:
            c.send(b"a" * 1024)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += 1024
    assert c.read_response().status == 431
    assert sent < 1024 * 1024


def test_unknown_but_registered_methods_reach_the_handler(client: Client) -> None:
    for method in ("PURGE", "PROPFIND", "QUERY", "OPTIONS", "DELETE", "PATCH"):
        client.send(get("/echo", method=method))
        assert client.read_response().json()["method"] == method


def test_options_asterisk(client: Client) -> None:
    client.send(get("*", method="OPTIONS"))
    seen = client.read_response().json()
    assert (seen["target"], seen["path"], seen["query"]) == ("*", "*", "")


def test_absolute_form_target(client: Client) -> None:
    client.send(b"GET http://example.com:8080/fn/a%20b?x=1 HTTP/1.1\r\nHost: elsewhere\r\n\r\n")
    seen = client.read_response().json()
    assert seen["target"] == "http://example.com:8080/fn/a%20b?x=1"
    assert seen["path"] == "/fn/a%20b"
    assert seen["query"] == "x=1"
    assert seen["headers"] == [["host", "example.com:8080"]]


def test_fragment_is_not_part_of_path_or_query(client: Client) -> None:
    client.send(get("/p?q=1#frag"))
    seen = client.read_response().json()
    assert (seen["path"], seen["query"]) == ("/p", "q=1")


def test_missing_host_is_accepted(client: Client) -> None:
    client.send(b"GET /echo HTTP/1.1\r\n\r\n")
    assert client.read_response().status == 200


def test_http10_chunked_request_closes_after_response(client: Client) -> None:
    client.send(
        b"POST /echo HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
    )
    reply = client.read_response()
    assert reply.json()["body"] == "abc"
    assert reply.header("connection") == "close"
    assert client.closed()


@pytest.mark.parametrize(
    "upgrade",
    [b"Connection: Upgrade\r\nUpgrade: websocket\r\n", b"Upgrade: h2c\r\n"],
    ids=["connection-upgrade", "upgrade-alone"],
)
def test_upgrade_is_answered_as_plain_http_and_ends_the_connection(
    server: ServerThread, client: Client, upgrade: bytes
) -> None:
    # A proxy may relay what follows as the upgraded stream: it must never be a request.
    client.send(b"GET /echo?1 HTTP/1.1\r\nHost: t\r\n" + upgrade + b"\r\n" + get("/echo?2"))
    reply = client.read_response()
    assert reply.json()["query"] == "1"
    assert reply.header("connection") == "close"
    assert client.closed()
    assert server.state.started == ["/echo"]


# --- timeouts -------------------------------------------------------------------------


def test_slowloris_head_gets_408(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server(header_timeout=0.4)
    c = Client(srv.port)
    head = get("/echo", *[f"X-{i}: {i}" for i in range(40)])
    start = time.monotonic()
    answered = False
    for i in range(len(head) - 1):  # never the final byte
        c.send(head[i : i + 1])
        if select.select([c.sock], [], [], 0.02)[0]:
            answered = True
            break
    assert answered, "the trickled head was never cut off"
    elapsed = time.monotonic() - start
    reply = c.read_response()
    assert reply.status == 408
    assert c.closed()
    # measured from the first byte, not reset by each new byte
    assert 0.3 <= elapsed < 2.0
    assert srv.state.started == []


def test_slow_body_gets_408(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server(body_timeout=0.3)
    c = Client(srv.port)
    c.send(get("/echo", "Content-Length: 10", method="POST") + b"abc")
    start = time.monotonic()
    reply = c.read_response()
    assert reply.status == 408
    assert time.monotonic() - start >= 0.2
    assert c.closed()
    assert srv.state.started == []


def test_silent_connection_is_closed_without_answer(
    make_server: Callable[..., ServerThread],
) -> None:
    srv = make_server(keep_alive_timeout=0.2, header_timeout=5)
    c = Client(srv.port)
    assert c.closed(timeout=WAIT)


def test_slow_handler_is_not_a_client_timeout(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server(keep_alive_timeout=0.1, header_timeout=0.1, body_timeout=0.1)
    c = Client(srv.port)
    c.send(get("/sleep/400"))
    assert c.read_response().status == 200


# --- disconnects and failures ---------------------------------------------------------


def test_disconnect_cancels_handler_without_leaks(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="hourai.ingress")
    c = Client(server.port)
    c.send(get("/block"))
    assert server.state.blocked.wait(WAIT)
    assert len(server.connections) == 1
    proto_ref = weakref.ref(next(iter(server.connections)))
    # A reset, not a FIN: a FIN may be a half-close from a client still reading.
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    assert server.state.cancelled.wait(WAIT)
    wait_for(lambda: not server.connections)

    def leftovers() -> tuple[int, bool]:
        gc.collect()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return len(tasks), proto_ref() is None

    # no pending handler task, and nothing (timer, task callback) still holds the protocol
    wait_for(lambda: server.run(leftovers) == (0, True))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_disconnect_mid_body_never_reaches_handler(server: ServerThread) -> None:
    c = Client(server.port)
    c.send(get("/echo", "Content-Length: 100", method="POST") + b"partial")
    wait_for(lambda: len(server.connections) == 1)
    c.close()
    wait_for(lambda: not server.connections)
    assert server.state.started == []


def test_handler_exception_is_500_and_connection_survives(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="hourai.ingress")
    client.send(get("/raise"))
    reply = client.read_response()
    assert reply.status == 500
    assert reply.body == b"internal error\n"
    records = [r for r in caplog.records if r.name == "hourai.ingress"]
    assert len(records) == 1
    assert records[0].exc_info is not None
    assert "boom from the handler" in str(records[0].exc_info[1])
    client.send(get("/echo"))
    assert client.read_response().status == 200


@pytest.mark.parametrize(
    "canned",
    [
        "not a response",
        Response(200, [], "a str body"),  # type: ignore[arg-type]
    ],
)
def test_handler_contract_violation_is_500(
    server: ServerThread, client: Client, caplog: pytest.LogCaptureFixture, canned: Any
) -> None:
    caplog.set_level(logging.ERROR, logger="hourai.ingress")
    server.state.canned = canned
    client.send(get("/canned"))
    assert client.read_response().status == 500
    assert [r for r in caplog.records if r.name == "hourai.ingress"]
    client.send(get("/echo"))
    assert client.read_response().status == 200


def test_shutdown_finishes_in_flight_then_closes(server: ServerThread) -> None:
    busy = Client(server.port)
    idle = Client(server.port)
    busy.send(get("/gate/x"))
    wait_for(lambda: server.state.count(server.state.started) == 1)
    wait_for(lambda: len(server.connections) == 2)
    server.run(lambda: [conn.shutdown() for conn in server.connections])
    assert idle.closed()
    server.open_gate()
    reply = busy.read_response()
    assert reply.body == b"/gate/x"
    assert reply.header("connection") == "close"
    assert busy.closed()


# --- serve() and a real client library -------------------------------------------------


def test_port_in_use_raises_oserror(server: ServerThread) -> None:
    async def second() -> None:
        await serve(make_handler(State()), "127.0.0.1", server.port)

    with pytest.raises(OSError):
        server.call(second())


def test_serve_on_given_socket(server: ServerThread) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    async def start() -> asyncio.AbstractServer:
        return await serve(make_handler(State()), "ignored", 0, sock=sock)

    extra = server.call(start())
    try:
        c = Client(port)
        c.send(get("/echo"))
        assert c.read_response().status == 200
        c.close()
    finally:
        server.run(extra.close)


def test_protocol_serves_a_unix_socket(server: ServerThread, tmp_path: Any) -> None:
    path = str(tmp_path / "http.sock")

    async def start() -> asyncio.AbstractServer:
        handler = make_handler(State())
        return await asyncio.get_running_loop().create_unix_server(
            lambda: HttpProtocol(handler), path
        )

    unix_server = server.call(start())
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(WAIT)
            sock.connect(path)
            sock.sendall(get("/echo?via=unix", "Connection: close"))
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200 OK")
        seen = json.loads(body)
        assert seen["query"] == "via=unix"
        assert seen["client"] == ["", 0]
    finally:
        server.run(unix_server.close)


def test_http_client_smoke(server: ServerThread) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT)
    try:
        conn.request("GET", "/echo?a=1", headers={"X-Test": "yes"})
        resp = conn.getresponse()
        seen = json.loads(resp.read())
        assert resp.status == 200
        assert seen["query"] == "a=1"
        assert ["x-test", "yes"] in seen["headers"]
        first_sock = conn.sock

        conn.request("POST", "/echo", body=b"payload")
        resp = conn.getresponse()
        assert json.loads(resp.read())["body"] == "payload"

        conn.request("POST", "/echo", body=iter([b"chunk-1 ", b"chunk-2"]), encode_chunked=True)
        resp = conn.getresponse()
        assert json.loads(resp.read())["body"] == "chunk-1 chunk-2"

        conn.request("HEAD", "/big/10")
        resp = conn.getresponse()
        assert resp.getheader("content-length") == "10"
        assert resp.read() == b""
        assert conn.sock is first_sock  # one keep-alive connection throughout
    finally:
        conn.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_handler_may_answer_with_a_future_which_a_disconnect_cancels(loop_kind: str) -> None:
    """What hourai's daemon does: no coroutine, the scheduler's future itself. It is
    answered when set, in order, and cancelled when the client resets."""

    async def scenario() -> tuple[list[bytes], bool]:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Response]] = []

        def handler(req: Request) -> asyncio.Future[Response]:
            future: asyncio.Future[Response] = loop.create_future()
            futures.append(future)
            if req.path == "/now":
                future.set_result(Response(200, [], b"now"))
            return future

        server = await serve(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(get("/later") + get("/now"))  # pipelined: answered in order
        while len(futures) < 2:
            await asyncio.sleep(0.001)
        futures[0].set_result(Response(200, [], b"later"))
        bodies = []
        for _ in range(2):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
            bodies.append(await reader.readexactly(length))
        writer.write(get("/never"))
        while len(futures) < 3:
            await asyncio.sleep(0.001)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()  # a reset
        for _ in range(int(WAIT * 1000)):
            if futures[2].done():
                break
            await asyncio.sleep(0.001)
        server.close()
        return bodies, futures[2].cancelled()

    run = uvloop.run if loop_kind == "uvloop" else asyncio.run
    bodies, cancelled = run(scenario())
    assert bodies == [b"later", b"now"]
    assert cancelled
