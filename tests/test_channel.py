"""Channel ends: fds passed beside frames arrive intact, even when a send has to wait."""

from __future__ import annotations

import asyncio
import os
import socket

from hourai.channel import AsyncChannel, BlockingChannel


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
