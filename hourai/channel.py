"""Blocking channel ends for the single-threaded zygotes and workers.

A thin I/O shell around :mod:`hourai.protocol`: frames out with ``sendmsg`` (fds as
SCM_RIGHTS), frames in with ``recvmsg``, the received fds queued in arrival order for the
message that declares them (``nfds``).
"""

from __future__ import annotations

import array
import os
import socket
from collections import deque
from collections.abc import Sequence

from hourai.protocol import FrameDecoder, Message, ProtocolError, encode

_RECV_BYTES = 256 * 1024
_MAX_FDS = 16


class ChannelClosed(Exception):
    """The other end went away."""


class BlockingChannel:
    __slots__ = ("_decoder", "_fds", "_ready", "sock")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self.sock = sock
        self._decoder = FrameDecoder()
        self._fds: deque[int] = deque()
        self._ready: deque[Message] = deque()

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, msg: Message, fds: Sequence[int] = ()) -> None:
        data = encode({**msg, "nfds": len(fds)} if fds else msg)
        if fds:
            sent = self.sock.sendmsg(
                [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            )
            if sent < len(data):
                self.sock.sendall(data[sent:])
        else:
            self.sock.sendall(data)

    def recv(self) -> tuple[Message, list[int]]:
        """The next message and the fds it carries; blocks; raises ChannelClosed at EOF."""
        while not self._ready:
            self._read_some()
        msg = self._ready.popleft()
        nfds = msg.get("nfds", 0)
        if len(self._fds) < nfds:
            raise ProtocolError(f"message {msg['t']!r} declares {nfds} fds, {len(self._fds)} came")
        return msg, [self._fds.popleft() for _ in range(nfds)]

    def has_buffered(self) -> bool:
        """Whether recv() can return without touching the socket."""
        return bool(self._ready)

    def _read_some(self) -> None:
        data, fds = recv_with_fds(self.sock)
        if not data:
            raise ChannelClosed()
        self._fds.extend(fds)
        self._ready.extend(self._decoder.feed(data))

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popleft())
        self.sock.close()


def recv_with_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One recvmsg: the bytes and any fds that came with them."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(
        _RECV_BYTES, socket.CMSG_SPACE(_MAX_FDS * fds.itemsize)
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % fds.itemsize
            fds.frombytes(payload[:usable])
    return data, list(fds)
