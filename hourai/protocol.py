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
  ← ``err``      {id, error_id, error, details}   the function raised; the worker lives on
  → ``debug``    {port, path}                open a debugpy listener on 127.0.0.1:port, debugpy
                                             imported from ``path`` (hourai debug; sent only
                                             to a worker forked for the session)
  ← ``debugging`` {host, port, pid} | {error}
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

Message = dict[str, Any]

# A frame carries at most one request or response body (6 MiB by default) plus headers,
# so anything far beyond that is corruption, not data; refuse it before buffering it.
MAX_FRAME = 64 * 1024 * 1024

_HEADER = struct.Struct(">I")
_packer = msgpack.Packer(use_bin_type=True)


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame; the channel cannot be trusted after this."""


def encode(msg: Message) -> bytes:
    """One frame: length prefix plus the msgpack body."""
    body = _packer.pack(msg)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME} byte limit")
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Bytes in, messages out; split the stream anywhere and the messages come out the same.

    After a :class:`ProtocolError` the decoder stays broken: a stream that lost its framing
    cannot be resynchronised, so the owner must close the channel.
    """

    __slots__ = ("_buf", "_error", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._error: ProtocolError | None = None
        self.max_frame = max_frame

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        if self._error is not None:
            raise self._error
        buf = self._buf
        buf += data
        out: list[Message] = []
        pos = 0
        end = len(buf)
        try:
            while end - pos >= 4:
                (size,) = _HEADER.unpack_from(buf, pos)
                if size == 0 or size > self.max_frame:
                    raise ProtocolError(
                        f"frame length {size} outside 1..{self.max_frame}: corrupt stream"
                    )
                if end - pos - 4 < size:
                    break
                out.append(_decode_body(buf, pos + 4, size))
                pos += 4 + size
        except ProtocolError as exc:
            self._error = exc
            del buf[:]
            raise
        if pos:
            del buf[:pos]
        return out


def _decode_body(buf: bytearray, start: int, size: int) -> Message:
    try:
        msg = msgpack.unpackb(memoryview(buf)[start : start + size], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"undecodable frame: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise ProtocolError(f"frame is not a message (a map with a string 't'): {msg!r:.80}")
    return msg
