"""Channel ends under random traffic: frames coalesced per loop turn, frames read into a
scratch buffer and split anywhere, fds beside some of them; all arrive whole, in order,
each with its own fds."""

from __future__ import annotations

import asyncio
import os
import socket
import threading

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hourai.channel import AsyncChannel, BlockingChannel, ChannelClosed

# A message is (size of its body, whether it carries an fd); bodies reach past the 256 KiB
# scratch buffer so that one frame takes several reads.
_message = st.tuples(
    st.one_of(st.integers(0, 300), st.integers(0, 600_000)),
    st.sampled_from([False, False, False, True]),
)
_turns = st.lists(st.lists(_message, max_size=12), min_size=1, max_size=8)
_settings = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _body(n: int, size: int) -> bytes:
    return bytes([n % 251]) * size


@_settings
@given(turns=_turns)
def test_what_the_loop_sends_in_turns_arrives_whole_and_in_order(turns) -> None:  # type: ignore[no-untyped-def]
    expected = [(n, size, fd) for n, (size, fd) in enumerate(m for turn in turns for m in turn)]
    ours, theirs = socket.socketpair()
    got: list[tuple[int, int, bool, bytes | None]] = []

    def read() -> None:
        reader = BlockingChannel(theirs)
        try:
            while True:
                msg, fds = reader.recv()
                tag = None
                for fd in fds:
                    tag = os.read(fd, 16)
                    os.close(fd)
                assert msg["body"] == _body(msg["n"], len(msg["body"]))
                got.append((msg["n"], len(msg["body"]), bool(fds), tag))
        except ChannelClosed:
            reader.close()

    async def send() -> None:
        loop = asyncio.get_running_loop()
        chan = AsyncChannel(loop, ours, lambda m, f: None, lambda r: None)
        n = 0
        for turn in turns:
            for size, with_fd in turn:
                msg = {"t": "x", "n": n, "body": _body(n, size)}
                if with_fd:
                    r, w = os.pipe()
                    os.write(w, str(n).encode())
                    os.close(w)
                    chan.send(msg, fds=[r])
                    os.close(r)  # the caller may close it at once
                else:
                    chan.send(msg)
                n += 1
            await asyncio.sleep(0)  # end of the turn
        while chan._out or chan._batch:
            await asyncio.sleep(0.001)
        chan.close()

    reader = threading.Thread(target=read)
    reader.start()
    asyncio.run(send())
    reader.join(30)
    assert [(n, size, fd) for n, size, fd, _tag in got] == expected
    assert all(tag == str(n).encode() for n, _size, fd, tag in got if fd)


@_settings
@given(messages=st.lists(_message, min_size=1, max_size=30))
def test_what_a_blocking_end_sends_the_loop_reads_whole_and_in_order(messages) -> None:  # type: ignore[no-untyped-def]
    ours, theirs = socket.socketpair()

    def write() -> None:
        writer = BlockingChannel(theirs)
        for n, (size, _fd) in enumerate(messages):
            writer.send({"t": "x", "n": n, "body": _body(n, size)})
        writer.close()

    async def receive() -> list[tuple[int, int]]:
        loop = asyncio.get_running_loop()
        got: list[tuple[int, int]] = []
        closed = loop.create_future()

        def on_message(msg: dict, _fds: list[int]) -> None:
            assert msg["body"] == _body(msg["n"], len(msg["body"]))
            got.append((msg["n"], len(msg["body"])))

        AsyncChannel(loop, ours, on_message, lambda r: closed.set_result(r))
        thread = threading.Thread(target=write)
        thread.start()
        await asyncio.wait_for(closed, 30)
        thread.join(30)
        return got

    got = asyncio.run(receive())
    assert got == [(n, size) for n, (size, _fd) in enumerate(messages)]
