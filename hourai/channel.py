"""Channel ends: thin I/O shells around :mod:`hourai.protocol`.

:class:`BlockingChannel` for the single-threaded zygotes and process-mode workers,
:class:`AsyncChannel` for event loops (the daemon; thread-mode workers). Frames go out with
``sendmsg`` (fds as SCM_RIGHTS) and come in with ``recvmsg``, the received fds queued in
arrival order for the message that declares them (``nfds``).
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
import threading
from collections import deque
from collections.abc import Callable, Sequence

from hourai.protocol import MAX_FRAME, FrameDecoder, Message, ProtocolError, Violation, encode

_RECV_BYTES = 256 * 1024
_MAX_FDS = 16
# Frames are coalesced only up to this many bytes a write: the point is many small frames
# per syscall; a large one goes as it is (joining and re-slicing megabytes is the cost).
_COALESCE_BYTES = 64 * 1024

# recv(256 KiB) allocates a fresh 256 KiB bytes object per call, which glibc serves with
# mmap, then shrinks (mremap) and frees (munmap): three syscalls and page faults for every
# frame. One scratch buffer per thread instead, copied out of at once by the decoder.
_scratch = threading.local()


def _scratch_buffer() -> memoryview:
    try:
        return _scratch.view  # type: ignore[no-any-return]
    except AttributeError:
        view = _scratch.view = memoryview(bytearray(_RECV_BYTES))
        return view


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


def recv_with_fds(sock: socket.socket) -> tuple[memoryview, list[int]]:
    """One recvmsg: the bytes and any fds that came with them. The bytes are a view of
    this thread's scratch buffer, valid until its next receive."""
    buf = _scratch_buffer()
    fds = array.array("i")
    size, ancdata, _flags, _addr = sock.recvmsg_into(
        [buf], socket.CMSG_SPACE(_MAX_FDS * fds.itemsize)
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % fds.itemsize
            fds.frombytes(payload[:usable])
    return buf[:size], list(fds)


def _recv(sock: socket.socket) -> memoryview:
    buf = _scratch_buffer()
    return buf[: sock.recv_into(buf)]


class AsyncChannel:
    """The daemon end of any channel (zygote, snapshot or worker), driven by loop readers.

    Messages (and the fds they declare) go to ``on_message``; ``on_close`` is called once,
    with the reason, when the peer goes away or breaks the protocol (then ``error`` holds
    the :class:`ProtocolError`). ``max_frame`` bounds what the peer may send in one frame.

    Each readable event reads at most one chunk and decodes frame by frame, stopping as soon
    as the channel is closed, so a peer that floods pays with its own frames being dropped,
    not with the daemon decoding them.

    Small frames sent in one turn of the loop go out in one write at its end (a frame with
    fds, or one that would make the write large, goes at once, after those before it):
    under load a worker's next invocations, or a thread-mode worker's answers, cost one
    syscall between them, not one each.
    """

    __slots__ = (
        "_batch",
        "_batch_bytes",
        "_closed",
        "_decoder",
        "_fds",
        "_loop",
        "_out",
        "_paused",
        "_with_fds",
        "error",
        "on_close",
        "on_message",
        "sock",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_message: Callable[[Message, list[int]], None],
        on_close: Callable[[str], None],
        *,
        with_fds: bool = False,
        max_frame: int = MAX_FRAME,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.on_message = on_message
        self.on_close = on_close
        self.error: ProtocolError | None = None
        self._loop = loop
        self._decoder = FrameDecoder(max_frame)
        self._fds: deque[int] = deque()
        self._out: deque[tuple[bytes, list[int]]] = deque()
        self._batch: list[bytes] = []  # frames of this loop turn, written at its end
        self._batch_bytes = 0
        self._with_fds = with_fds
        self._closed = False
        self._paused = False
        loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def paused(self) -> bool:
        return self._paused

    def pause_reading(self) -> None:
        """Take no more frames from the peer until :meth:`resume_reading`: frames already
        read stay undecoded, and the peer's sends block once the socket buffers are full
        (that is the back-pressure: a slow consumer stops the producer)."""
        if self._paused or self._closed:
            return
        self._paused = True
        self._loop.remove_reader(self.sock.fileno())

    def resume_reading(self) -> None:
        if not self._paused or self._closed:
            return
        self._paused = False
        self._loop.add_reader(self.sock.fileno(), self._on_readable)
        if self._decoder.pending:
            # Frames read before the pause come first; not from inside the caller's frame.
            self._loop.call_soon(self._decode)

    @property
    def max_frame(self) -> int:
        return self._decoder.max_frame

    @max_frame.setter
    def max_frame(self, limit: int) -> None:
        self._decoder.max_frame = limit

    def send(self, msg: Message, fds: Sequence[int] = ()) -> None:
        """Send a frame; the caller may close `fds` as soon as this returns (a frame that has
        to wait for the socket keeps duplicates of them)."""
        if self._closed:
            return
        data = encode({**msg, "nfds": len(fds)} if fds else msg)
        if not fds and self._batch_bytes + len(data) <= _COALESCE_BYTES:
            batch = self._batch
            batch.append(data)
            self._batch_bytes += len(data)
            if len(batch) == 1:
                self._loop.call_soon(self._flush_batch)
            return
        if self._batch:
            self._flush_batch()  # the frames before it go first
            if self._closed:
                return
        if self._out:
            self._out.append((data, [os.dup(fd) for fd in fds]))
            return
        self._write(data, fds, owned=False)

    def _flush_batch(self) -> None:
        batch = self._batch
        if not batch or self._closed:
            return
        data = batch[0] if len(batch) == 1 else b"".join(batch)
        batch.clear()
        self._batch_bytes = 0
        if self._out:
            self._out.append((data, []))
        else:
            self._write(data, (), owned=False)

    def _write(self, data: bytes, fds: Sequence[int], *, owned: bool) -> None:
        try:
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                sent = self.sock.sendmsg([data], anc)
            else:
                sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            if not self._out:
                self._loop.add_writer(self.sock.fileno(), self._on_writable)
            # Queued: keep the fds alive ourselves, the caller is about to close its own.
            self._out.appendleft((data, list(fds) if owned else [os.dup(fd) for fd in fds]))
            return
        except OSError as exc:
            if owned:
                _close_all(fds)
            self.close(f"write failed: {exc.strerror}")
            return
        if owned:
            _close_all(fds)  # they went with the first byte
        if sent < len(data):
            if not self._out:
                self._loop.add_writer(self.sock.fileno(), self._on_writable)
            self._out.appendleft((data[sent:], []))

    def _on_writable(self) -> None:
        pending, self._out = self._out, deque()
        while pending and not self._out and not self._closed:
            data, fds = pending.popleft()
            self._write(data, fds, owned=True)
        if self._closed:
            for _data, fds in pending:
                _close_all(fds)
            return
        self._out.extend(pending)
        if not self._out:
            self._loop.remove_writer(self.sock.fileno())

    def _on_readable(self) -> None:
        try:
            if self._with_fds:
                data, fds = recv_with_fds(self.sock)
                self._fds.extend(fds)
            else:
                data = _recv(self.sock)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"read failed: {exc.strerror}")
            return
        if not data:
            self.close("closed by peer")
            return
        try:
            self._decoder.push(data)
        except ProtocolError as exc:
            self._broken(exc)
            return
        self._decode()

    def _decode(self) -> None:
        decoder = self._decoder
        while not self._closed and not self._paused:
            try:
                msg = decoder.next()
            except ProtocolError as exc:
                self._broken(exc)
                return
            if msg is None:
                return
            fds: list[int] = []
            if self._fds:
                nfds = msg.get("nfds", 0)
                if type(nfds) is not int:
                    self._broken(ProtocolError(f"{msg['t']!r:.40} frame: nfds is not an integer"))
                    return
                fds = [self._fds.popleft() for _ in range(min(nfds, len(self._fds)))]
            try:
                self.on_message(msg, fds)
            except Violation as exc:  # the owner found the message itself unacceptable
                self._broken(exc)
                return

    def _broken(self, exc: ProtocolError) -> None:
        self.error = exc
        self.close(f"protocol error: {exc}")

    def close(self, reason: str = "closed") -> None:
        if self._closed:
            return
        if self._batch and not self._out:
            # What was sent this turn still goes, if the socket takes it now (a last
            # command before a close); like queued output, it is dropped if it does not.
            try:
                self.sock.send(b"".join(self._batch))
            except OSError:
                pass
        self._batch.clear()
        self._batch_bytes = 0
        self._closed = True
        fd = self.sock.fileno()
        self._loop.remove_reader(fd)
        if self._out:
            self._loop.remove_writer(fd)
        self.sock.close()
        while self._fds:
            os.close(self._fds.popleft())
        while self._out:
            _close_all(self._out.popleft()[1])
        self.on_close(reason)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
