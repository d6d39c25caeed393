"""Streaming responses: ASGI bodies with more_body and WSGI generators reach the client as
they are produced, chunked, with back-pressure from the client to the function.

Live tests run `hourai run` on tests/functions/streams.py and read with raw sockets, so what
is asserted is what a client sees on the wire, when it sees it. The frame validation and
the chunked framing are also driven by hypothesis.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httptools
import psutil
import pytest
from conftest import EXAMPLES, FUNCTIONS, HouraiProcess, wait_until
from hypothesis import given
from hypothesis import strategies as st

from hourai.ingress import HttpProtocol, Request, Response, StreamSink, chunk_frame
from hourai.isolate.adapters import AsgiInvoker, Outlet, WsgiInvoker
from hourai.protocol import ResponseTooLarge, Violation, check_worker_reply

STREAMS = str(FUNCTIONS / "streams.py")
HOSTILE = str(FUNCTIONS / "hostile_worker.py")


# --------------------------------------------------------------------------- a raw client


class Exchange:
    """One response read off a socket: head, and each body line with when it arrived."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.lines: list[tuple[float, bytes]] = []
        self.done = False
        self._partial = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        now = time.time()
        self.body += body
        data = self._partial + body
        *complete, self._partial = data.split(b"\n")
        self.lines.extend((now, line) for line in complete if line)

    def on_message_complete(self) -> None:
        self.done = True


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


class _Responses:
    """httptools callbacks for a stream of responses: a new Exchange per message."""

    def __init__(self) -> None:
        self.out: list[Exchange] = []

    def on_message_begin(self) -> None:
        self.out.append(Exchange())

    def on_header(self, name: bytes, value: bytes) -> None:
        self.out[-1].on_header(name, value)

    def on_body(self, body: bytes) -> None:
        self.out[-1].on_body(body)

    def on_message_complete(self) -> None:
        self.out[-1].done = True


def read_responses(
    sock: socket.socket, count: int = 1, *, head: bool = False, deadline: float = 60
) -> list[Exchange]:
    """Read ``count`` responses (``head``: the answer to a HEAD) or until the server closes;
    a response still incomplete then is returned with ``done`` false."""
    calls = _Responses()
    parser = httptools.HttpResponseParser(calls)
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        data = sock.recv(65536)
        if not data:
            last = calls.out[-1] if calls.out else None
            if (
                last is not None
                and not last.done
                and not {"content-length", "transfer-encoding"}.intersection(last.headers)
            ):
                last.done = True  # close-delimited
            break
        if head and b"\r\n\r\n" in data:
            ex = Exchange()
            for line in data.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
                name, _, value = line.partition(b": ")
                ex.on_header(name, value)
            ex.status = int(data.split()[1])
            return [ex]
        parser.feed_data(data)
        if calls.out and calls.out[-1].done:
            calls.out[-1].status = parser.get_status_code()
            if len(calls.out) == count:
                break
        elif calls.out and not calls.out[-1].status and calls.out[-1].headers:
            calls.out[-1].status = parser.get_status_code()
    for ex in calls.out:
        ex.status = ex.status or parser.get_status_code()
    return calls.out


def _get(path: str, version: str = "1.1", method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/{version}\r\nhost: t\r\n\r\n".encode()


@pytest.fixture
def streams(hourai_run) -> Iterator:  # type: ignore[no-untyped-def]
    started: dict[str, HouraiProcess] = {}

    def start(attr: str, *args: str) -> HouraiProcess:
        key = attr + " ".join(args)
        if key not in started:
            started[key] = hourai_run(f"{STREAMS}:{attr}", *args)
        return started[key]

    yield start


# --------------------------------------------------------------------------- as produced


def _produced(line: bytes) -> tuple[int, float]:
    fields = line.removeprefix(b"data: ").split()
    return int(fields[0]), float(fields[1])


@pytest.mark.parametrize(
    ("attr", "path"),
    [
        ("fastapi_app", "/events?n=5&gap=0.2"),
        ("raw_asgi", "/x?n=5&gap=0.2"),
        ("wsgi_app", "/x?n=5&gap=0.2"),
    ],
)
def test_each_chunk_arrives_before_the_next_is_produced(streams, attr: str, path: str) -> None:
    fn = streams(attr)
    with _connect(fn.port) as sock:
        sock.sendall(_get(path))
        (ex,) = read_responses(sock)
    assert ex.status == 200 and ex.done
    assert ex.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in ex.headers
    assert ex.headers.get("x-hourai-start")
    events = [(arrived, *_produced(line)) for arrived, line in ex.lines]
    assert [i for _, i, _ in events] == list(range(5))
    for (arrived, i, _), (_, _, next_produced) in itertools.pairwise(events):
        assert arrived < next_produced, f"chunk {i} arrived after chunk {i + 1} was produced"


def test_wsgi_lists_and_handlers_stay_one_buffered_frame(streams) -> None:
    fn = streams("wsgi_app")
    with _connect(fn.port) as sock:
        sock.sendall(_get("/list"))
        (ex,) = read_responses(sock)
    assert ex.headers.get("content-length") == "9" and bytes(ex.body) == b"one frame"
    fn = streams("handler")
    with _connect(fn.port) as sock:
        sock.sendall(_get("/"))
        (ex,) = read_responses(sock)
    assert ex.headers.get("content-length") == "8" and bytes(ex.body) == b"buffered"
    assert "transfer-encoding" not in ex.headers


def test_pipelined_requests_wait_behind_a_stream_in_order(streams) -> None:
    fn = streams("raw_asgi")
    with _connect(fn.port) as sock:
        sock.sendall(_get("/a?n=3&gap=0.2") + _get("/b?n=1") + _get("/c?n=2&gap=0.05"))
        exchanges = read_responses(sock, 3)
    assert [len(ex.lines) for ex in exchanges] == [3, 1, 2]
    assert all(ex.done and ex.status == 200 for ex in exchanges)
    # The quick ones were produced during the first stream, but came after its end.
    assert exchanges[1].lines[0][0] >= exchanges[0].lines[-1][0]


def test_http10_streams_close_delimited(streams) -> None:
    fn = streams("wsgi_app")
    with _connect(fn.port) as sock:
        sock.sendall(_get("/x?n=3&gap=0.05", "1.0"))
        (ex,) = read_responses(sock)
    assert "transfer-encoding" not in ex.headers and "content-length" not in ex.headers
    assert ex.headers.get("connection") == "close"
    assert len(ex.lines) == 3


def test_head_of_a_stream_has_no_body_and_keeps_the_connection(streams) -> None:
    fn = streams("raw_asgi")
    with _connect(fn.port) as sock:
        sock.sendall(_get("/x?n=50&gap=0.2", method="HEAD"))
        (head,) = read_responses(sock, head=True)
        assert head.headers.get("transfer-encoding") == "chunked" and not head.body
        sock.sendall(_get("/x?n=2&gap=0.01"))
        (ex,) = read_responses(sock)
    assert len(ex.lines) == 2


def test_a_slow_client_does_not_grow_the_daemon_while_200mb_stream(streams) -> None:
    fn = streams("raw_asgi", "--max-workers", "1", "--spares", "0")
    daemon = psutil.Process(fn.proc.pid)
    with _connect(fn.port) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(_get("/big?mb=200"))
        before = daemon.memory_info().rss
        peak = before
        for _ in range(30):  # 3 s of reading nothing at all
            peak = max(peak, daemon.memory_info().rss)
            time.sleep(0.1)
        received = 0
        end = time.monotonic() + 120
        while time.monotonic() < end:
            data = sock.recv(1 << 20)
            if not data:
                break
            received += len(data)
            if received % (16 << 20) < len(data):
                peak = max(peak, daemon.memory_info().rss)
                time.sleep(0.05)  # and then slowly
            if data.endswith(b"0\r\n\r\n"):
                break
    assert received > 200 << 20
    assert peak - before < 48 << 20, f"the daemon grew by {(peak - before) >> 20} MiB"


def test_a_client_leaving_mid_stream_frees_the_worker(streams) -> None:
    fn = streams("raw_asgi", "--max-workers", "1", "--spares", "0")
    with _connect(fn.port) as sock:
        sock.sendall(_get("/forever"))
        got = b""
        while got.count(b"\n") < 8:
            got += sock.recv(4096)
    began = time.monotonic()
    with _connect(fn.port) as sock:
        sock.sendall(_get("/x?n=1"))
        (ex,) = read_responses(sock, deadline=20)
    assert ex.status == 200 and len(ex.lines) == 1
    # Told at its next chunk (50 ms), well before the grace after which it would be killed.
    assert time.monotonic() - began < 5
    wait_until(lambda: "raw-asgi GET /forever 200" in fn.log, timeout=10)
    assert "killed" not in fn.log


def test_a_function_raising_mid_stream_cuts_the_body_off(streams) -> None:
    fn = streams("wsgi_app")
    with _connect(fn.port) as sock:
        sock.sendall(_get("/raise"))
        (ex,) = read_responses(sock)
    assert ex.status == 200 and bytes(ex.body) == b"first\n"
    assert not ex.done  # no last chunk: the client can tell it is incomplete
    wait_until(lambda: "broke mid-stream" in fn.log, timeout=10)


# --------------------------------------------------------------------------- violations


@pytest.mark.parametrize(
    ("path", "violation", "cut_off"),
    [
        ("stream-chunk-unasked", "chunk frame for request", False),
        ("stream-chunk-bad-more", "chunk frame: more must be true or false", False),
        ("stream-more-false", "res frame: more must be true when given", False),
        ("stream-res-twice", "already streaming", True),
        ("stream-chunk-oversized", "response chunk of 400.0 KiB is over max_response_size", True),
    ],
)
def test_streaming_frames_out_of_order_kill_the_worker(
    hourai_run, path: str, violation: str, cut_off: bool
) -> None:
    fn = hourai_run(HOSTILE, "--spares", "0", "--max-response-size", "300K")
    with _connect(fn.port) as sock:
        sock.sendall(_get(f"/{path}?s=20"))
        (ex,) = read_responses(sock, deadline=15)
    if cut_off:
        assert ex.status == 200 and bytes(ex.body) == b"head\n" and not ex.done
    else:
        assert ex.status == 502 and violation in bytes(ex.body).decode()
    wait_until(lambda: violation in fn.log and "killed" in fn.log, timeout=10)


def test_a_chunk_after_the_end_kills_the_worker(hourai_run) -> None:
    fn = hourai_run(HOSTILE, "--spares", "0")
    with _connect(fn.port) as sock:
        sock.sendall(_get("/stream-chunk-after-end?s=20"))
        (ex,) = read_responses(sock, deadline=15)
    assert ex.done and bytes(ex.body) == b"head\nend\n"
    wait_until(lambda: "which is not streaming" in fn.log and "killed" in fn.log, timeout=10)


_ids = st.integers(min_value=-(2**40), max_value=2**40)
_values = st.one_of(st.none(), st.booleans(), _ids, st.binary(max_size=40), st.text(max_size=5))


@given(
    st.dictionaries(
        st.sampled_from(["id", "body", "more", "status", "headers", "x"]), _values, max_size=6
    )
)
def test_chunk_frame_validation_accepts_exactly_the_well_formed(fields: dict) -> None:  # type: ignore[type-arg]
    msg = {"t": "chunk", **fields}
    well_formed = (
        set(fields) == {"id", "body", "more"}
        and type(fields["id"]) is int
        and type(fields["body"]) is bytes
        and type(fields["more"]) is bool
    )
    limit = 20
    try:
        check_worker_reply(msg, limit)
    except ResponseTooLarge:
        assert well_formed and len(fields["body"]) > limit
    except Violation:
        assert not well_formed
    else:
        assert well_formed and len(fields["body"]) <= limit


@given(st.sampled_from([True, False, None, 1, "true"]))
def test_res_more_is_true_or_absent(more: object) -> None:
    msg = {"t": "res", "id": 1, "status": 200, "headers": [], "body": b"", "more": more}
    if more is True:
        check_worker_reply(msg, 10)
    else:
        with pytest.raises(Violation):
            check_worker_reply(msg, 10)


# --------------------------------------------------------------------------- chunked framing


def _parse_chunked(wire: bytes, splits: list[int]) -> tuple[bytes, bool]:
    ex = Exchange()
    parser = httptools.HttpResponseParser(ex)
    points = sorted({min(p, len(wire)) for p in splits})
    last = 0
    for p in [*points, len(wire)]:
        parser.feed_data(wire[last:p])
        last = p
    return bytes(ex.body), ex.done


@given(st.lists(st.binary(max_size=300), max_size=20), st.lists(st.integers(0, 10_000)))
def test_chunk_frames_reassemble_to_the_body(chunks: list[bytes], splits: list[int]) -> None:
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    wire = head + b"".join(chunk_frame(c) for c in chunks) + b"0\r\n\r\n"
    assert _parse_chunked(wire, splits) == (b"".join(chunks), True)


class _FakeStream:
    """A BodyStream fed by the test, recording what the ingress asked of it."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.sink: StreamSink | None = None
        self.calls: list[str] = []

    def attach(self, sink: StreamSink) -> None:
        self.sink = sink
        self.calls.append("attach")
        for c in self.chunks:
            sink.write(c)
        sink.end()

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")

    def cancel(self) -> None:
        self.calls.append("cancel")


@given(st.lists(st.binary(max_size=2000), max_size=12), st.integers(1, 3))
def test_the_ingress_frames_any_stream_so_it_reassembles(chunks: list[bytes], repeat: int) -> None:
    """Through a real connection: any chunks, pipelined with ordinary answers, in order."""

    async def run() -> bytes:
        async def handler(request: Request) -> Response:
            if request.path == "/s":
                return Response(200, [], b"", _FakeStream(list(chunks)))
            return Response(200, [], b"plain")

        server = await asyncio.get_running_loop().create_server(
            lambda: HttpProtocol(handler), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write((_get("/s") + _get("/p")) * repeat + _get("/p", "1.0"))
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        server.close()
        return data

    data = asyncio.run(run())
    got: list[Exchange] = []

    class Many:
        def __init__(self) -> None:
            self.cur = Exchange()

        def on_header(self, n: bytes, v: bytes) -> None:
            self.cur.on_header(n, v)

        def on_body(self, b: bytes) -> None:
            self.cur.body += b

        def on_message_complete(self) -> None:
            got.append(self.cur)
            self.cur = Exchange()

    many = Many()
    parser = httptools.HttpResponseParser(many)
    parser.feed_data(data)
    if many.cur.headers:  # the last, close-delimited 1.0 answer
        got.append(many.cur)
    bodies = [bytes(e.body) for e in got]
    assert bodies == [b"".join(chunks), b"plain"] * repeat + [b"plain"]


def test_the_ingress_cancels_a_stream_whose_client_left() -> None:
    cancelled = threading.Event()

    class Endless(_FakeStream):
        def attach(self, sink: StreamSink) -> None:
            self.sink = sink
            sink.write(b"first")

        def cancel(self) -> None:
            cancelled.set()

    async def run() -> None:
        async def handler(request: Request) -> Response:
            return Response(200, [], b"", Endless([]))

        server = await asyncio.get_running_loop().create_server(
            lambda: HttpProtocol(handler), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_get("/s"))
        await reader.readuntil(b"first\r\n")
        # A reset, as from a client that is gone (a FIN alone may be a half-close, and is
        # found out at the next write)
        sock = writer.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        for _ in range(100):
            if cancelled.is_set():
                break
            await asyncio.sleep(0.01)
        server.close()

    asyncio.run(run())
    assert cancelled.is_set()


# --------------------------------------------------------------------------- thread isolation


@pytest.mark.parametrize("attr", ["raw_asgi", "wsgi_app"])
def test_thread_isolation_streams_as_produced_too(streams, attr: str) -> None:
    fn = streams(attr, "--concurrency", "4", "--max-workers", "1")
    with _connect(fn.port) as a, _connect(fn.port) as b:
        a.sendall(_get("/x?n=4&gap=0.2"))
        b.sendall(_get("/x?n=4&gap=0.2"))
        # both read at once: a line's arrival is when the client could first see it
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(read_responses, (a, b)))
    for (ex,) in results:
        assert ex.done and ex.headers.get("transfer-encoding") == "chunked"
        events = [(arrived, *_produced(line)) for arrived, line in ex.lines]
        assert [i for _, i, _ in events] == list(range(4))
        for (arrived, i, _), (_, _, next_produced) in itertools.pairwise(events):
            assert arrived < next_produced, f"chunk {i} arrived after chunk {i + 1} was produced"


def test_thread_isolation_drops_a_stream_its_client_does_not_take(streams) -> None:
    """Several invocations share the channel, so it is not paused for one slow client: the
    stream may hold max_response_size, then it is dropped; the worker serves on."""
    fn = streams(
        "raw_asgi", "--concurrency", "2", "--max-workers", "1", "--max-response-size", "2M"
    )
    daemon = psutil.Process(fn.proc.pid)
    before = daemon.memory_info().rss
    with _connect(fn.port) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(_get("/big?mb=200"))
        wait_until(lambda: "stream dropped" in fn.log, timeout=30)
        peak = daemon.memory_info().rss
        received = 0
        with contextlib.suppress(OSError):
            for _ in range(100_000):
                data = sock.recv(1 << 20)
                if not data:
                    break
                received += len(data)
    assert received < 100 << 20  # cut off, far short of the 200 MiB
    assert peak - before < 48 << 20, f"the daemon grew by {(peak - before) >> 20} MiB"
    with _connect(fn.port) as sock:
        sock.sendall(_get("/x?n=2&gap=0.01"))
        (ex,) = read_responses(sock, deadline=20)
    assert ex.done and len(ex.lines) == 2


def test_the_timeout_covers_the_whole_stream(streams) -> None:
    fn = streams("raw_asgi", "--timeout", "1", "--spares", "0")
    began = time.monotonic()
    with _connect(fn.port) as sock:
        sock.sendall(_get("/forever"))
        (ex,) = read_responses(sock, deadline=20)
    assert ex.status == 200 and ex.lines and not ex.done  # cut off, not completed
    assert 0.9 < time.monotonic() - began < 10
    wait_until(lambda: "timed out after 1s" in fn.log, timeout=10)


def test_flask_answers_stay_one_frame_and_the_log_has_a_streams_whole_latency(
    hourai_run, streams
) -> None:
    flask = hourai_run(str(EXAMPLES / "flask_app" / "app.py"))
    with _connect(flask.port) as sock:
        sock.sendall(_get("/"))
        (ex,) = read_responses(sock)
    assert "content-length" in ex.headers and "transfer-encoding" not in ex.headers
    fn = streams("raw_asgi")
    with _connect(fn.port) as sock:
        sock.sendall(_get("/x?n=4&gap=0.2"))
        read_responses(sock)
    wait_until(lambda: "raw-asgi GET /x?n=4&gap=0.2 200" in fn.log, timeout=10)
    line = next(x for x in fn.log.splitlines() if "raw-asgi GET /x?n=4&gap=0.2 200" in x)
    assert float(line.rsplit(" ", 1)[1].removesuffix("ms")) >= 550  # to the end: 3 gaps


# --------------------------------------------------------------------------- adapters


class _Outlet(Outlet):
    def __init__(self, cancel_after: int | None = None) -> None:
        super().__init__()
        self.frames: list[tuple[str, bytes]] = []
        self.cancel_after = cancel_after

    def head(self, status: int, headers: list[list[str]], body: bytes) -> None:
        self.started = True
        self.frames.append(("head", body))

    def chunk(self, body: bytes) -> None:
        self.frames.append(("chunk", body))
        if self.cancel_after is not None and len(self.frames) >= self.cancel_after:
            self.cancel()


def _inv(method: str = "GET") -> dict:  # type: ignore[type-arg]
    return {"t": "inv", "id": 1, "method": method, "path": "/", "query": "", "headers": []}


def test_wsgi_streams_generators_but_not_lists_or_known_lengths() -> None:
    closed: list[str] = []

    def app(environ, start_response):  # type: ignore[no-untyped-def]
        headers = [("content-length", "4")] if environ["PATH_INFO"] == "/sized" else []

        def gen() -> Iterator[bytes]:
            try:
                start_response("200 OK", headers)
                yield b"ab"
                yield b"cd"
            finally:
                closed.append("closed")

        if environ["PATH_INFO"] == "/list":
            start_response("200 OK", headers)
            return [b"abcd"]
        return gen()

    invoker = WsgiInvoker(app, "app")
    for path, streamed in (("/", True), ("/list", False), ("/sized", False)):
        outlet = _Outlet()
        result = invoker.invoke({**_inv(), "path": path}, outlet)
        got = b"".join(b for _, b in outlet.frames) + result["body"]
        assert got == b"abcd" and outlet.started is streamed, path
    outlet = _Outlet()
    result = invoker.invoke(_inv("HEAD"), outlet)
    assert outlet.frames == [("head", b"")] and result["body"] == b""
    assert closed[-1] == "closed"  # stopped at its first chunk, and closed


def test_asgi_stops_the_app_when_its_client_leaves() -> None:
    sent: list[int] = []

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(1000):
            sent.append(i)
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    invoker = AsgiInvoker(app, "app")
    outlet = _Outlet(cancel_after=3)
    result = invoker.invoke(_inv(), outlet)
    assert len(sent) == 4 and result["body"] == b""  # the 4th send raised ClientGone


def test_an_idle_sse_stream_is_stopped_as_soon_as_its_client_leaves(streams) -> None:
    """FastAPI's StreamingResponse listens for the disconnect: with 30 s between events it
    learns of the client's leaving at once, not at its next event (nor by a kill)."""
    fn = streams("fastapi_app", "--max-workers", "1", "--spares", "0")
    with _connect(fn.port) as sock:
        sock.sendall(_get("/events?n=3&gap=30"))
        got = b""
        while b"data: 0" not in got:
            got += sock.recv(4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    began = time.monotonic()
    with _connect(fn.port) as sock:
        sock.sendall(_get("/plain"))
        (ex,) = read_responses(sock, deadline=20)
    assert ex.status == 200 and bytes(ex.body) == b'{"hello":"world"}'
    assert time.monotonic() - began < 1.5  # under the 2 s grace before a kill
    assert "killed" not in fn.log
