"""A streaming response on its way from a worker's channel to a client's connection.

:class:`WorkerStream` is the daemon's side of :class:`hourai.ingress.BodyStream`: the daemon
pushes each ``chunk`` frame's body into it, the ingress attaches the client's connection and
says when the client stops and starts taking bytes. What it holds is bounded either way:

* ``exclusive`` (process isolation: the worker runs this invocation only): whenever the
  client is not taking bytes, the worker's channel stops being read. The worker's sends then
  block, and so does the function. At most the frames of one channel read are held.
* otherwise (thread isolation, several invocations share the channel, and pausing it would
  stall the others): chunks are held up to ``max_held`` bytes; past that the stream is
  cancelled and its client's connection dropped, since one slow client must not cost the
  daemon unbounded memory or stall the worker's other invocations.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from hourai.channel import AsyncChannel
from hourai.ingress import StreamSink
from hourai.units import format_size


class WorkerStream:
    __slots__ = (
        "_channel",
        "_client_paused",
        "_exclusive",
        "_held",
        "_held_bytes",
        "_max_held",
        "_on_cancel",
        "_sink",
        "cancelled",
        "ended",
    )

    def __init__(
        self,
        channel: AsyncChannel,
        *,
        exclusive: bool,
        max_held: int,
        on_cancel: Callable[[str], None],
    ) -> None:
        self._channel = channel
        self._exclusive = exclusive
        self._max_held = max_held
        self._on_cancel = on_cancel
        self._sink: StreamSink | None = None
        self._held: deque[bytes] = deque()
        self._held_bytes = 0
        self._client_paused = False
        self.cancelled = False
        # None while the worker still produces; "" once it ended; else why it was cut off.
        self.ended: str | None = None

    @property
    def held(self) -> int:
        """Bytes received from the worker that the client has not been given yet."""
        return self._held_bytes

    # -- from the daemon (the worker's frames)

    def push(self, data: bytes) -> None:
        if self.cancelled or not data:
            return
        sink = self._sink
        if sink is not None and not self._client_paused and not self._held:
            sink.write(data)
            return
        self._held.append(data)
        self._held_bytes += len(data)
        if self._exclusive:
            self._channel.pause_reading()
        elif self._held_bytes > self._max_held:
            self._give_up(
                f"the client took too little of the stream: over {format_size(self._max_held)} "
                "held for it (max_response_size)"
            )

    def finish(self, failure: str = "") -> None:
        """The worker's last frame (``failure``: the stream cannot complete, say why)."""
        if self.ended is not None:
            return
        self.ended = failure
        self._resume_channel()
        if failure:
            self._held.clear()
            self._held_bytes = 0
            if self._sink is not None and not self.cancelled:
                self._sink.abort(failure)
        else:
            self._drain()

    # -- from the ingress (the client's side)

    def attach(self, sink: StreamSink) -> None:
        self._sink = sink
        if self.cancelled:
            sink.abort("stream cancelled")
        elif self.ended:
            sink.abort(self.ended)
        else:
            self._drain()

    def pause(self) -> None:
        self._client_paused = True
        if self._exclusive and self.ended is None:
            self._channel.pause_reading()

    def resume(self) -> None:
        self._client_paused = False
        self._drain()

    def cancel(self) -> None:
        self._cancel("")

    # --

    def _cancel(self, reason: str) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        self._held.clear()
        self._held_bytes = 0
        self._resume_channel()  # what still comes is read and dropped
        if self.ended is None:
            self._on_cancel(reason)

    def _give_up(self, reason: str) -> None:
        sink = self._sink
        self._cancel(reason)
        if sink is not None:
            sink.abort(reason)

    def _drain(self) -> None:
        sink = self._sink
        if sink is None or self.cancelled:
            return
        held = self._held
        # A write can pause the client at once (the transport's high-water mark).
        while held and not self._client_paused:
            data = held.popleft()
            self._held_bytes -= len(data)
            sink.write(data)
        if held:
            return
        if self.ended == "":
            sink.end()
        elif not self._client_paused:
            self._resume_channel()

    def _resume_channel(self) -> None:
        if self._exclusive:
            self._channel.resume_reading()
