"""Channel ends under random traffic: frames read into a scratch buffer and split
anywhere arrive whole and in order."""

from __future__ import annotations

import asyncio
import socket
import threading

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hourai.channel import AsyncChannel, BlockingChannel

# A message is (size of its body, whether it carries an fd); bodies reach past the 256 KiB
# scratch buffer so that one frame takes several reads.
_message = st.tuples(
    st.one_of(st.integers(0, 300), st.integers(0, 600_000)),
    st.sampled_from([False, False, False, True]),
)
_settings = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _body(n: int, size: int) -> bytes:
    return bytes([n % 251]) * size


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
