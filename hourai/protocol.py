"""The wire format between the daemon, the zygotes and the workers — its only home.

Every channel is a unix stream socket carrying frames: a 4-byte big-endian length, then a
msgpack map with a string field ``"t"`` naming the message type. The codec is sans-I/O in
the manner of h11: :func:`encode` turns a message into bytes, :class:`FrameDecoder` turns
bytes (split anywhere) into messages, and neither touches a socket, so the same code runs in
the asyncio daemon and in the blocking single-threaded zygotes.

File descriptors travel beside the frames as SCM_RIGHTS ancillary data. A message that
carries fds says how many in its ``"nfds"`` field; the receiver keeps the fds it got in
arrival order and takes that many for the message. (The kernel delivers ancillary data with
the first byte of the ``sendmsg`` that sent it, so the fds are in hand no later than the last
byte of their frame.)

Messages (``→`` daemon to child, ``←`` child to daemon):

root zygote channel
  → ``spawn``    {fid, spec, nfds=1}         fork a function snapshot; the fd is its channel
  ← ``spawned``  {fid, pid}
  ← ``exited``   {pid, status}               a snapshot ended (reaped by the root zygote)

snapshot channel
  ← ``ready``    {kind, attr, init_ms, pid}  the function is imported and initialised
  ← ``failed``   {error, details}            it could not be (the snapshot then exits)
  → ``fork``     {wid}                       fork one worker
  ← ``forked``   {wid, pid, nfds=2}          fds: the worker's channel, its output pipe
  ← ``fork_failed`` {wid, error}
  ← ``exited``   {pid, status}               a worker ended (reaped by its snapshot)
  → ``stop``     {}                          kill the workers and exit

worker channel
  → ``inv``      {id, method, path, root_path, query, headers, body, client, server,
                  scheme, http_version, request_id, function, deadline_ms,
                  [event], [trace]}
                 optional: ``event`` a direct invocation's JSON event; ``trace`` the W3C
                 traceparent of hourai's invocation span when tracing is on (the worker
                 makes it the function's current OpenTelemetry context, hourai.isolate.context)
  ← ``res``      {id, status, headers, body}
  ← ``res``      {id, status, headers, body, more=true}   a streaming response: the head and
                                             the body so far; ``chunk`` frames follow
  ← ``chunk``    {id, body, more}            more of a streaming body; ``more=false`` ends it
  ← ``err``      {id, error_id, error}       the function raised; the worker lives on (mid-
                                             stream: the response is cut off)
  → ``cancel``   {id}                        the client of a streaming response went away:
                                             stop the function's stream and end it

A worker stays busy with a streaming request until its last ``chunk`` (or ``err``); the
daemon checks the order (a chunk for a request that is not streaming, a ``res`` for one that
is, anything after the end), and bounds each frame's body by ``max_response_size``: a stream
as a whole is unbounded, held in memory a frame at a time.

A worker runs tenant code, and tenant code can reach the worker's end of its channel, so the
daemon treats what comes back as hostile input: the decoder of a worker channel is bounded
by the function's ``max_response_size`` (refused from the length prefix alone, before the
body is buffered), and :func:`check_worker_reply` checks every field of every frame before
the daemon touches it. Both raise :class:`Violation`, which names what was wrong.
  ← ``err``      {id, error_id, error, details}   the function raised; the worker lives on
  → ``debug``    {port, path}                open a debugpy listener on 127.0.0.1:port, debugpy
                                             imported from ``path`` (hourai debug; sent only
                                             to a worker forked for the session)
  ← ``debugging`` {host, port, pid} | {error}
"""

from __future__ import annotations

import struct
from typing import Any, NoReturn

import msgpack

from hourai.units import format_size

Message = dict[str, Any]

# A frame carries at most one request or response body (6 MiB by default) plus headers,
# so anything far beyond that is corruption, not data; refuse it before buffering it.
MAX_FRAME = 64 * 1024 * 1024

_HEADER = struct.Struct(">I")
_packer = msgpack.Packer(use_bin_type=True)


# A response frame carries status and headers beside the body; this much room for them.
RESPONSE_OVERHEAD = 256 * 1024
MAX_RESPONSE_HEADERS = 500
MAX_ERROR_TEXT = 16 * 1024  # an "err" frame's exception text and error id together

_RES_FIELDS = 5  # t, id, status, headers, body
_STREAM_RES_FIELDS = 6  # ... and more
_CHUNK_FIELDS = 4  # t, id, body, more
_ERR_FIELDS = 4  # t, id, error_id, error


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame; the channel cannot be trusted after this."""


class Violation(ProtocolError):
    """A worker sent something the protocol does not allow; the message says what."""


class FrameTooLarge(ProtocolError):
    """A frame's length prefix is over the decoder's bound (known before its body came)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame length {size} outside 1..{limit}: corrupt stream")
        self.size = size
        self.limit = limit


class ResponseTooLarge(Violation):
    """A response body over the function's ``max_response_size``."""

    def __init__(
        self, size: int, limit: int, *, framed: bool = False, what: str = "response"
    ) -> None:
        # framed: only the frame's length prefix was read, which counts headers too
        what = "response frame" if framed else what
        super().__init__(
            f"{what} of {format_size(size, exact=False)} is over max_response_size "
            f"({format_size(limit)})"
        )
        self.size = size
        self.limit = limit


def response_frame_limit(max_response_size: int) -> int:
    """The decoder bound for a worker channel whose responses may be this large."""
    return max_response_size + RESPONSE_OVERHEAD


def check_worker_reply(msg: Message, max_body: int) -> None:
    """Raise :class:`Violation` unless ``msg`` is a well-formed ``res``, ``chunk`` or ``err``
    frame (whether it fits the request's state is the daemon's check: see the docstring).

    On the warm path for every response: a few ``type() is`` checks, no schema machinery.
    Exact types, not isinstance: bool is an int and would pass as a status.
    """
    t = msg["t"]
    if t == "chunk":
        if len(msg) != _CHUNK_FIELDS:
            _fields(msg, ("t", "id", "body", "more"))
        if type(msg.get("id")) is not int:
            raise Violation(f"chunk frame: id must be an integer, got {msg.get('id')!r:.40}")
        body = msg.get("body")
        if type(body) is not bytes:
            raise Violation(f"chunk frame: body must be bytes, got {type(body).__name__}")
        if len(body) > max_body:
            raise ResponseTooLarge(len(body), max_body, what="response chunk")
        if type(msg.get("more")) is not bool:
            raise Violation("chunk frame: more must be true or false")
    elif t == "res":
        if "more" in msg:
            if msg["more"] is not True:
                raise Violation("res frame: more must be true when given")
            if len(msg) != _STREAM_RES_FIELDS:
                _fields(msg, ("t", "id", "status", "headers", "body", "more"))
        elif len(msg) != _RES_FIELDS:
            _fields(msg, ("t", "id", "status", "headers", "body"))
        if type(msg.get("id")) is not int:
            raise Violation(f"res frame: id must be an integer, got {msg.get('id')!r:.40}")
        status = msg.get("status")
        if type(status) is not int or not 100 <= status <= 599:
            raise Violation(f"res frame: status must be an integer 100..599, got {status!r:.40}")
        headers = msg.get("headers")
        if type(headers) is not list:
            raise Violation(f"res frame: headers must be a list, got {type(headers).__name__}")
        if len(headers) > MAX_RESPONSE_HEADERS:
            raise Violation(f"res frame: {len(headers)} headers, more than {MAX_RESPONSE_HEADERS}")
        for pair in headers:
            if (
                type(pair) is not list
                or len(pair) != 2
                or type(pair[0]) is not str
                or type(pair[1]) is not str
            ):
                raise Violation(f"res frame: a header must be [name, value] strings: {pair!r:.60}")
        body = msg.get("body")
        if type(body) is not bytes:
            raise Violation(f"res frame: body must be bytes, got {type(body).__name__}")
        if len(body) > max_body:
            raise ResponseTooLarge(len(body), max_body)
    elif t == "err":
        if len(msg) != _ERR_FIELDS:
            _fields(msg, ("t", "id", "error_id", "error"))
        if type(msg.get("id")) is not int:
            raise Violation(f"err frame: id must be an integer, got {msg.get('id')!r:.40}")
        error_id, error = msg.get("error_id"), msg.get("error")
        if type(error_id) is not str or type(error) is not str:
            raise Violation("err frame: error_id and error must be strings")
        if len(error_id) + len(error) > MAX_ERROR_TEXT:
            raise Violation(f"err frame: error text over {MAX_ERROR_TEXT} characters")
    elif t == "imported":
        if len(msg) != 2 or "modules" not in msg:
            _fields(msg, ("t", "modules"))
        _modules(msg, "modules")
    else:
        raise Violation(
            f"unexpected {t!r:.40} frame from a worker (it may send res, chunk, err or imported)"
        )


def _modules(msg: Message, key: str) -> None:
    from hourai.snapshot.learn import check_modules

    try:
        check_modules(msg[key], key)
    except ValueError as exc:
        raise Violation(f"{msg['t']} frame: {exc}") from None


# What a function's snapshot may tell the daemon: frame type -> (its fields, fds it carries).
# The snapshot runs the tenant's module-level code, which can reach this channel too.
_SNAPSHOT_FRAMES: dict[str, tuple[tuple[str, ...], int]] = {
    "forked": (("t", "wid", "pid"), 3),  # the worker's channel, output pipe, pidfd
    "exited": (("t", "pid", "code", "signal", "wid"), 0),
    "fork_failed": (("t", "wid", "error"), 0),
    "ready": (("t", "kind", "attr", "init_ms", "pid", "modules"), 0),
    "failed": (("t", "error", "details"), 0),
}
SNAPSHOT_FRAME_MAX = 1024 * 1024
MAX_SNAPSHOT_DETAILS = 64 * 1024  # a refused deploy's traceback: enough to read, bounded


def check_snapshot_message(msg: Message, nfds: int) -> None:
    """Raise :class:`Violation` unless ``msg`` is a frame a snapshot may send."""
    t = msg["t"]
    expected = _SNAPSHOT_FRAMES.get(t) if type(t) is str else None
    if expected is None:
        raise Violation(f"unexpected {t!r:.40} frame from a snapshot")
    fields, fds = expected
    given = len(msg) - ("nfds" in msg)  # the channel's own count of the fds that came along
    if given != len(fields) or any(k not in msg for k in fields):
        _fields({k: v for k, v in msg.items() if k != "nfds"}, fields)
    if nfds != fds:
        raise Violation(f"{t} frame: carries {nfds} fds, not {fds}")
    # (a debug session's worker has a negative id: the scheduler's are positive)
    if "wid" in msg and type(msg["wid"]) is not int:
        raise Violation(f"{t} frame: wid must be an integer")
    if "pid" in msg and (type(msg["pid"]) is not int or msg["pid"] < 0):
        raise Violation(f"{t} frame: pid must be a non-negative integer")
    for key in ("code", "signal"):
        if key in msg and msg[key] is not None and type(msg[key]) is not int:
            raise Violation(f"{t} frame: {key} must be an integer or nil")
    if t == "ready":
        if msg["kind"] not in ("handler", "asgi", "wsgi") or type(msg["attr"]) is not str:
            raise Violation("ready frame: kind must be handler, asgi or wsgi; attr a string")
        if type(msg["init_ms"]) not in (int, float) or len(msg["attr"]) > 1000:
            raise Violation("ready frame: init_ms must be a number, attr at most 1000 chars")
        _modules(msg, "modules")
    for key, bound in (("error", MAX_ERROR_TEXT), ("details", MAX_SNAPSHOT_DETAILS)):
        if key in msg and (type(msg[key]) is not str or len(msg[key]) > bound):
            raise Violation(f"{t} frame: {key} must be a string of at most {bound} characters")


# What a package zygote (hourai.snapshot.tree) may tell the daemon; it runs the tenant's
# packages' module-level code.
_ZYGOTE_FRAMES: dict[str, tuple[tuple[str, ...], int]] = {
    "zygote_ready": (("t", "pid", "loaded", "failed", "init_ms"), 0),
    "spawned": (("t", "fid", "pid"), 1),  # a pidfd of the child
    "exited": (("t", "pid", "code", "signal", "fid"), 0),
    "failed": (("t", "error", "details"), 0),
}


def check_zygote_message(msg: Message, nfds: int) -> None:
    """Raise :class:`Violation` unless ``msg`` is a frame a package zygote may send."""
    t = msg["t"]
    expected = _ZYGOTE_FRAMES.get(t) if type(t) is str else None
    if expected is None:
        raise Violation(f"unexpected {t!r:.40} frame from a zygote")
    fields, fds = expected
    given = len(msg) - ("nfds" in msg)
    if given != len(fields) or any(k not in msg for k in fields):
        _fields({k: v for k, v in msg.items() if k != "nfds"}, fields)
    if nfds != fds:
        raise Violation(f"{t} frame: carries {nfds} fds, not {fds}")
    if "pid" in msg and (type(msg["pid"]) is not int or msg["pid"] < 0):
        raise Violation(f"{t} frame: pid must be a non-negative integer")
    if "fid" in msg and (type(msg["fid"]) is not str or len(msg["fid"]) > 300):
        raise Violation(f"{t} frame: fid must be a string")
    for key in ("code", "signal"):
        if key in msg and msg[key] is not None and type(msg[key]) is not int:
            raise Violation(f"{t} frame: {key} must be an integer or nil")
    if t == "zygote_ready":
        _modules(msg, "loaded")
        _modules(msg, "failed")
        if type(msg["init_ms"]) not in (int, float):
            raise Violation("zygote_ready frame: init_ms must be a number")
    for key, bound in (("error", MAX_ERROR_TEXT), ("details", MAX_SNAPSHOT_DETAILS)):
        if key in msg and (type(msg[key]) is not str or len(msg[key]) > bound):
            raise Violation(f"{t} frame: {key} must be a string of at most {bound} characters")


def _fields(msg: Message, expected: tuple[str, ...]) -> None:
    missing = [k for k in expected if k not in msg]
    extra = sorted(repr(k)[:40] for k in msg if k not in expected)[:5]
    what = []
    if missing:
        what.append(f"missing {', '.join(missing)}")
    if extra:
        what.append(f"unknown {', '.join(extra)}")
    raise Violation(f"{msg['t']} frame: {'; '.join(what)}")


def encode(msg: Message) -> bytes:
    """One frame: length prefix plus the msgpack body."""
    body = _packer.pack(msg)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME} byte limit")
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Bytes in, messages out; split the stream anywhere and the messages come out the same.

    :meth:`feed` decodes everything it is given; :meth:`push` and :meth:`next` decode one
    frame at a time, so a reader that stops at the first bad frame spends nothing on the
    frames behind it (a flooding peer's burst is dropped undecoded). A frame whose length
    prefix is over ``max_frame`` is refused as soon as its 4 header bytes arrive.

    After a :class:`ProtocolError` the decoder stays broken: a stream that lost its framing
    cannot be resynchronised, so the owner must close the channel.
    """

    __slots__ = ("_buf", "_error", "_pos", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._error: ProtocolError | None = None
        self.max_frame = max_frame

    @property
    def pending(self) -> int:
        """Bytes received that are not yet decoded."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | memoryview) -> list[Message]:
        self.push(data)
        out: list[Message] = []
        while (msg := self.next()) is not None:
            out.append(msg)
        return out

    def push(self, data: bytes | memoryview) -> None:
        if self._error is not None:
            raise self._error
        buf = self._buf
        if self._pos:
            del buf[: self._pos]
            self._pos = 0
        buf += data
        if len(buf) >= 4:
            self._check_size(_HEADER.unpack_from(buf, 0)[0])

    def next(self) -> Message | None:
        """The next whole message, or None until more bytes are pushed."""
        if self._error is not None:
            raise self._error
        buf, pos = self._buf, self._pos
        left = len(buf) - pos
        if left < 4:
            return None
        (size,) = _HEADER.unpack_from(buf, pos)
        self._check_size(size)
        if left - 4 < size:
            return None
        try:
            msg = _decode_body(buf, pos + 4, size)
        except ProtocolError as exc:
            self._fail(exc)
        self._pos = pos + 4 + size
        if self._pos == len(buf):
            del buf[:]
            self._pos = 0
        return msg

    def _check_size(self, size: int) -> None:
        if size > self.max_frame:
            self._fail(FrameTooLarge(size, self.max_frame))
        if size == 0:
            self._fail(ProtocolError(f"frame length 0 outside 1..{self.max_frame}: corrupt stream"))

    def _fail(self, exc: ProtocolError) -> NoReturn:
        self._error = exc
        del self._buf[:]
        self._pos = 0
        raise exc


def _decode_body(buf: bytearray, start: int, size: int) -> Message:
    try:
        msg = msgpack.unpackb(memoryview(buf)[start : start + size], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"undecodable frame: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise ProtocolError(f"frame is not a message (a map with a string 't'): {msg!r:.80}")
    return msg
