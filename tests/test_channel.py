"""Channel ends: fds passed beside frames arrive intact, even when a send has to wait; a
broken or refused frame closes the channel at once, saying why."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

from hourai.channel import AsyncChannel, BlockingChannel
from hourai.protocol import FrameTooLarge, Violation, encode


def test_fds_queued_behind_a_full_socket_survive_the_caller_closing_them(tmp_path) -> None:
    files = []
    for i in range(50):
        path = tmp_path / f"f{i}"
        path.write_text(str(i))
        files.append(path)

    async def scenario() -> list[tuple[dict, list[int]]]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        chan = AsyncChannel(loop, ours, lambda m, f: None, lambda r: None)
        filler = b"x" * 2000
        for i, path in enumerate(files):
            fd = os.open(path, os.O_RDONLY)
            chan.send({"t": "file", "i": i, "pad": filler}, fds=[fd])
            os.close(fd)  # as the daemon does right after send()
        assert chan._out, "the socket never filled: the test proves nothing"
        reader = BlockingChannel(theirs)
        got = []
        while len(got) < len(files):
            await asyncio.sleep(0)  # let the channel flush as the reader drains
            got.append(await loop.run_in_executor(None, reader.recv))
        chan.close()
        reader.close()
        return got

    got = asyncio.run(scenario())
    for msg, fds in got:
        (fd,) = fds
        assert os.read(fd, 10).decode() == str(msg["i"])
        os.close(fd)


def test_a_violation_stops_the_channel_at_that_frame_and_says_why() -> None:
    """The owner refuses a message: the channel closes with the violation as its error, and
    nothing sent behind it (a flood, here thousands of frames in the same read) is handed
    over."""

    async def scenario() -> tuple[list[int], list[str], Exception | None]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        seen: list[int] = []
        closed: list[str] = []

        def on_message(msg: dict, _fds: list[int]) -> None:
            seen.append(msg["n"])
            if msg["n"] == 2:
                raise Violation("frame 2 is not allowed")

        chan = AsyncChannel(loop, ours, on_message, closed.append)
        theirs.sendall(b"".join(encode({"t": "x", "n": n}) for n in range(5000)))
        for _ in range(1000):
            if closed:
                break
            await asyncio.sleep(0.001)
        theirs.close()
        return seen, closed, chan.error

    seen, closed, error = asyncio.run(scenario())
    assert seen == [0, 1, 2]
    assert closed == ["protocol error: frame 2 is not allowed"]
    assert isinstance(error, Violation)


def test_a_frame_over_the_channels_bound_closes_it_before_its_body_arrives() -> None:
    async def scenario() -> tuple[list[str], Exception | None]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        closed: list[str] = []
        chan = AsyncChannel(loop, ours, lambda m, f: None, closed.append, max_frame=1000)
        theirs.sendall(struct.pack(">I", 1001))  # the header alone; the body never comes
        for _ in range(1000):
            if closed:
                break
            await asyncio.sleep(0.001)
        theirs.close()
        return closed, chan.error

    closed, error = asyncio.run(scenario())
    assert closed and isinstance(error, FrameTooLarge) and error.size == 1001
