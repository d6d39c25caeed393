"""The worker's serve loops: invocations in over the channel, results out.

"process" isolation (concurrency 1, like a Lambda instance): a blocking loop, one invocation
at a time, nothing between the channel and the function. "thread" isolation (concurrency
N > 1): the worker's own event loop reads the channel and runs up to N invocations at once,
async functions and ASGI apps as tasks on that loop, sync ones in a pool of N threads, each
call in a copy of its task's context (the invocation's log mark and trace context, see
:mod:`hourai.isolate.context`).

A response the function streams (an ASGI body with ``more_body``, a WSGI generator) goes out
as it is produced, through an :class:`Outlet`: a ``res`` frame with ``more`` at the first
chunk, ``chunk`` frames after it, and the last one when the function returns. In process
mode the sends block while the daemon is not reading, so a slow client slows the function
down rather than filling memory; a ``cancel`` from the daemon (the client left) stops the
function's stream at its next chunk.

A function that raises gets a 500 with an error id; the traceback goes to this worker's
output, which the daemon logs tagged with the function and worker, so the id finds it.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import select
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hourai.channel import AsyncChannel, BlockingChannel, ChannelClosed
from hourai.isolate import context, debugging, direct
from hourai.isolate.adapters import Invoker, Outlet, new_event_loop
from hourai.isolate.tracebacks import user_paths
from hourai.protocol import MAX_ERROR_TEXT, Message, ProtocolError
from hourai.snapshot import learn

# The traceback is in the worker's output; the daemon only needs the gist, within its bound.
_MAX_ERROR = MAX_ERROR_TEXT // 4

# A request-shaped message for warm_up: every field the adapters read, nothing of a tenant's.
_DUMMY = {
    "t": "inv",
    "id": 0,
    "method": "GET",
    "path": "/",
    "root_path": "",
    "query": "a=1",
    "headers": [["host", "warm-up"], ["user-agent", "hourai"]],
    "body": b"",
    "client": ["127.0.0.1", 0],
    "server": ["127.0.0.1", 0],
    "scheme": "http",
    "http_version": "1.1",
    "request_id": "warm-up",
    "function": "warm-up",
    "deadline_ms": 1000,
}


def warm_up(invoker: Invoker) -> bool:
    """Walk the worker's own request path once, through a stand-in for the function.
    Returns whether the walk went through (it is only a head start: failing, it says why
    on stderr, and whoever called it serves all the same).

    A fresh fork shares every page with its snapshot; the first request then pays a
    copy-on-write fault (several microseconds on a VM) for each page it writes to, and
    runs each of hourai's functions on its way for the first time in this process. A spare
    has time to pay that before its first request; a worker forked for a waiting request
    does not, and skips this (see serve_worker). A sync function's snapshot walks it too,
    before it forks, so that what the interpreter specialises is done once (Snapshot.run).
    The stand-in is an invoker of the
    function's kind around a function of hourai's that answers at once, so the decoder, the
    invocation context, the adapter and the encoder all run as for a real request, and
    nothing of the tenant's; the answer then goes out and in over a socket pair of its own.
    (The stand-in, against the decoder and adapter helpers alone: the hello handler's first
    request on a spare ran 0.82 -> 0.51 ms, a warm one 0.23.)
    """
    from hourai.protocol import FrameDecoder, encode

    (inv,) = FrameDecoder().feed(encode(_DUMMY))
    try:
        stand_in = _stand_in(invoker)
        if invoker.is_async:
            loop = invoker.loop  # type: ignore[attr-defined]
            reply = loop.run_until_complete(run_invocation_async(stand_in, inv))
        else:
            reply = run_invocation(stand_in, inv)
        # The answer's way out and an invocation's way in, over a channel of our own.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with ours, theirs:
            send_reply(BlockingChannel(ours), inv, reply)
            BlockingChannel(theirs).recv()
    except Exception as exc:
        print(
            f"hourai: the walk of hourai's request path failed: {exc!r}",
            file=sys.stderr,
            flush=True,
        )
        return False
    return True


def _stand_in(invoker: Invoker) -> Invoker:
    """An invoker of ``invoker``'s kind and options around a function that answers at once."""
    from hourai.isolate import adapters

    if invoker.kind == "wsgi":
        return adapters.WsgiInvoker(
            _wsgi_stand_in, "warm-up", multithread=getattr(invoker, "multithread", False)
        )
    if invoker.kind == "asgi":
        return adapters.AsgiInvoker(_asgi_stand_in, "warm-up")
    is_async = invoker.is_async
    return adapters.HandlerInvoker(
        _async_handler_stand_in if is_async else _handler_stand_in,
        "warm-up",
        is_async=is_async,
        takes_context=True,
        memory_limit_mb=getattr(invoker, "memory_limit_mb", None),
    )


_STAND_IN_ANSWER = {"statusCode": 200, "headers": {"content-type": "text/plain"}, "body": ""}


def _handler_stand_in(event: Any, context: Any) -> dict[str, Any]:
    return _STAND_IN_ANSWER


async def _async_handler_stand_in(event: Any, context: Any) -> dict[str, Any]:
    return _STAND_IN_ANSWER


def _wsgi_stand_in(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("content-type", "text/plain")])
    return [b""]


async def _asgi_stand_in(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def prime(invoker: Invoker, requests: list[str] | tuple[str, ...]) -> float:
    """Serve the function's declared warm-up requests (``warmup`` in its hourai.toml) in the
    snapshot, before it forks anything: what a framework does lazily on its first request
    (Flask compiles its URL map, templates are parsed and cached) is then done once and
    shared by every worker, instead of paid by each in its first request. Like SnapStart's
    priming; opt-in, since it runs the function's code for real. Returns the milliseconds.

    Raises StartupError if one fails or leaves a thread behind (a fork keeps no thread but
    the one forking: a pool's thread would be gone in every worker, its locks held)."""
    from hourai.isolate.adapters import StartupError

    started = time.perf_counter()
    before = threading.active_count()
    for request, reply in _serve_warmup(invoker, requests):
        if reply["t"] == "err":
            raise StartupError(
                f"warm-up request {request!r} raised {reply['error']} "
                "(its traceback is in the function's log)"
            )
        status = reply["status"]
        if status >= 500:
            raise StartupError(
                f"warm-up request {request!r} answered {status} (see the function's log)"
            )
        if status >= 400:  # primed all the same, but likely a mistaken path
            print(f"hourai: warm-up request {request!r} answered {status}", file=sys.stderr)
    left = threading.active_count() - before
    if left > 0:
        names = ", ".join(t.name for t in threading.enumerate() if t is not threading.main_thread())
        raise StartupError(
            f"the warm-up requests left {left} thread(s) running ({names}): a worker forked "
            "now would inherit their locks but not them; warm up without starting threads"
        )
    return (time.perf_counter() - started) * 1000


def prime_spare(invoker: Invoker, requests: list[str] | tuple[str, ...]) -> None:
    """A spare serves the declared warm-up requests again, in itself, before its first
    request: the snapshot's run made the framework's lazy state once for all, but a fresh
    fork still copies in, page by page, what its first request writes to (for a Flask app
    about 2.5 ms of its first request; a warm worker's takes 2.2 ms in all). Only a head
    start: what goes wrong is said in the function's log, and the spare serves on."""
    for request, reply in _serve_warmup(invoker, requests):
        if reply["t"] == "err" or reply["status"] >= 500:
            what = reply.get("error") or f"answered {reply.get('status')}"
            print(f"hourai: a spare's warm-up request {request!r}: {what}", file=sys.stderr)


def _serve_warmup(
    invoker: Invoker, requests: list[str] | tuple[str, ...]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each warm-up request ("/path?query" or "METHOD /path") and the function's reply."""
    for i, request in enumerate(requests):
        method, _, target = request.rpartition(" ")
        path, _, query = target.partition("?")
        inv = {
            **_DUMMY,
            "id": i,
            "method": method or "GET",
            "path": path,
            "query": query,
            "headers": [["host", "warm-up"], ["user-agent", "hourai warm-up"]],
            "request_id": f"warm-up-{i}",
        }
        yield request, run_invocation(invoker, inv)


class ChannelOutlet(Outlet):
    """Outlet frames of one invocation: ``send`` puts a frame on the channel; ``poll``, if
    given, looks for a ``cancel`` after each chunk (process mode: nobody else reads)."""

    __slots__ = ("_max", "_poll", "_send", "_watch", "id")

    def __init__(
        self,
        rid: int,
        max_chunk: int,
        send: Callable[[Message], None],
        poll: Callable[[ChannelOutlet], None] | None = None,
        watch: Callable[[], int] | None = None,
    ) -> None:
        super().__init__()
        self.id = rid
        self._watch = watch
        self._max = max(1, max_chunk)
        self._send = send
        self._poll = poll

    def head(self, status: int, headers: list[list[str]], body: bytes) -> None:
        self.started = True
        first, rest = body[: self._max], body[self._max :]
        self._send(
            {
                "t": "res",
                "id": self.id,
                "status": status,
                "headers": headers,
                "body": first,
                "more": True,
            }
        )
        self.chunk(rest)

    def chunk(self, body: bytes) -> None:
        step = self._max
        for i in range(0, len(body), step):
            self._send({"t": "chunk", "id": self.id, "body": body[i : i + step], "more": True})
        if self._poll is not None:
            self._poll(self)

    def cancel_fd(self) -> int | None:
        return self._watch() if self._watch is not None else None

    def check_cancel(self) -> None:
        if self._poll is not None:
            self._poll(self)

    def end_frames(self, body: bytes) -> list[Message]:
        """The stream's last frames: the rest of the body, then the end."""
        step = self._max
        frames: list[Message] = [
            {"t": "chunk", "id": self.id, "body": body[i : i + step], "more": True}
            for i in range(0, len(body) - step, step)
        ]
        tail = body[len(frames) * step :]
        frames.append({"t": "chunk", "id": self.id, "body": tail, "more": False})
        return frames


class _ProcessWorker:
    """The serve loop of a process-mode worker, one invocation at a time.

    Frames the daemon sent ahead (the next invocation, queued while this one runs) wait in
    ``held`` when a stream's cancel poll reads past them, and are served in order.
    """

    __slots__ = ("channel", "debug", "held", "imports", "invoker", "me", "watcher")

    def __init__(
        self, channel: BlockingChannel, invoker: Invoker, imports: learn.ImportWatch
    ) -> None:
        self.channel = channel
        self.invoker = invoker
        self.imports = imports
        self.me = os.getpid()
        self.debug = False
        self.held: deque[Message] = deque()
        self.watcher: list[select.epoll] = []

    def poll(self, outlet: ChannelOutlet) -> None:
        """Look for the cancel of ``outlet``'s stream without blocking."""
        channel = self.channel
        try:
            while channel.has_buffered() or select.select([channel.sock], [], [], 0)[0]:
                msg, _fds = channel.recv()
                if msg["t"] == "cancel":
                    if msg.get("id") == outlet.id:
                        outlet.cancel()
                else:
                    self.held.append(msg)  # the next invocation, sent ahead
        except ChannelClosed:
            outlet.cancel()  # the daemon is gone; so is the client

    def watch(self) -> int:
        # An event loop's add_reader would make the channel's socket non-blocking, and the
        # sends of a stream must block (that is the back-pressure): the loop watches an
        # epoll instance that watches the socket instead.
        if not self.watcher:
            ep = select.epoll()
            ep.register(self.channel.fileno(), select.EPOLLIN)
            self.watcher.append(ep)
        return self.watcher[0].fileno()

    def next(self) -> tuple[Message, ChannelOutlet | None] | None:
        """The next invocation (and its outlet, if it may stream); None once the daemon has
        gone."""
        while True:
            if self.held:
                inv = self.held.popleft()
            else:
                try:
                    inv, _fds = self.channel.recv()
                except ChannelClosed:
                    return None
            if inv["t"] == "inv":
                break
            if inv["t"] == "debug":  # hourai debug: this worker is the session's
                self.debug = True
                self.imports.left = 0  # debugpy is the debugger's import, not the function's
                self.channel.send(debugging.start(inv))
            # else e.g. the cancel of a stream that ended meanwhile
        outlet = None
        if "stream" in inv and self.invoker.kind != "handler":  # a handler's answer is buffered
            outlet = ChannelOutlet(
                inv["id"], inv["stream"], self.channel.send, self.poll, self.watch
            )
        if self.debug:
            debugging.busy(1)
        return inv, outlet

    def answer(self, inv: Message, outlet: ChannelOutlet | None, reply: Message) -> None:
        if self.debug:
            debugging.busy(-1)
        if os.getpid() != self.me:
            # The function forked and this is the child coming back: it must never answer
            # on (or read from) the worker's channel.
            os._exit(0)
        if outlet is not None and outlet.started:
            finish_stream(self.channel.send, outlet, reply)
        else:
            send_reply(self.channel, inv, reply)
        report_imports(self.channel.send, self.imports)

    def serve(self) -> None:
        while (job := self.next()) is not None:
            inv, outlet = job
            self.answer(inv, outlet, run_invocation(self.invoker, inv, outlet))

    async def serve_async(self) -> None:
        """The same loop for async code, on the worker's event loop, which runs for the
        worker's life: run_until_complete per invocation cost ~125 µs (uvloop sets up its
        signal wake-up socketpair at every start). Between invocations the loop is blocked
        in recv, so nothing of the function's runs then, as before."""
        loop = asyncio.get_running_loop()
        while (job := self.next()) is not None:
            inv, outlet = job
            # A task per invocation, as run_until_complete gave: its own copy of the context.
            reply = await loop.create_task(run_invocation_async(self.invoker, inv, outlet))
            self.answer(inv, outlet, reply)


def serve_worker(
    channel: BlockingChannel,
    invoker: Invoker,
    imports: learn.ImportWatch | None,
    warmup: list[str] | tuple[str, ...] = (),
) -> None:
    """Process mode: one invocation at a time. ``imports`` was made by the snapshot, before
    it forked: made here it would copy every module name's page in (a refcount each).
    ``warmup``: we are a spare, forked ahead of demand; serve these first (prime_spare)."""
    if not select.select([channel.sock], [], [], 0)[0]:
        # Nothing is waiting: we are (or may as well be) a spare, pay the page faults now.
        if warmup:
            prime_spare(invoker, warmup)
        else:
            warm_up(invoker)
    worker = _ProcessWorker(channel, invoker, imports)
    loop = getattr(invoker, "loop", None) if invoker.is_async else None
    if loop is None:
        worker.serve()
    else:
        loop.run_until_complete(worker.serve_async())


def report_imports(send: Callable[[Message], None], imports: learn.ImportWatch | None) -> None:
    """Tell the daemon what packages the first invocations imported (the zygote tree's)."""
    if imports is not None:
        new = imports.after_invocation()
        if new:
            send({"t": "imported", "modules": new})


def finish_stream(send: Callable[[Message], None], outlet: ChannelOutlet, reply: Message) -> None:
    """End a stream: its last frames, or the error that cut it off (none if the client left
    first: the daemon asked for the stop, there is nothing to report)."""
    if reply["t"] == "err" and not outlet.cancelled:
        send(reply)
        return
    body = reply["body"] if reply["t"] == "res" else b""
    for frame in outlet.end_frames(body):
        send(frame)


def send_reply(
    channel: BlockingChannel | AsyncChannel, inv: dict[str, Any], reply: Message
) -> None:
    """Send the answer; one that cannot be framed (over the frame limit, or not msgpack-able)
    becomes the function's error, not the worker's death."""
    try:
        channel.send(reply)
    except (ProtocolError, TypeError, ValueError, OverflowError) as exc:
        channel.send(error_reply(inv, exc))


def run_invocation(
    invoker: Invoker, inv: dict[str, Any], outlet: Outlet | None = None
) -> dict[str, Any]:
    tokens = context.enter(inv)
    try:
        if "event" in inv:
            result = direct.run(invoker, inv)
        elif outlet is not None:
            result = invoker.invoke(inv, outlet)
        else:
            result = invoker.invoke(inv)
    except Exception as exc:
        if outlet is not None and outlet.cancelled:
            # The app saw its client leave (a send raised): not the function's error.
            return {"t": "res", "id": inv["id"], "status": 200, "headers": [], "body": b""}
        return error_reply(inv, exc)
    finally:
        context.leave(tokens)
    return {
        "t": "res",
        "id": inv["id"],
        "status": result["status"],
        "headers": result["headers"],
        "body": result["body"],
    }


async def run_invocation_async(
    invoker: Invoker, inv: dict[str, Any], outlet: Outlet | None = None
) -> dict[str, Any]:
    """:func:`run_invocation` on an event loop: async code is awaited, sync code runs in
    the loop's executor (the invoker's ``invoke_async`` decides)."""
    tokens = context.enter(inv)
    try:
        if "event" in inv:
            result = await direct.run_async(invoker, inv)
        elif outlet is not None:
            result = await invoker.invoke_async(inv, outlet)
        else:
            result = await invoker.invoke_async(inv)
    except Exception as exc:
        if outlet is not None and outlet.cancelled:
            return {"t": "res", "id": inv["id"], "status": 200, "headers": [], "body": b""}
        return error_reply(inv, exc)
    finally:
        context.leave(tokens)
    return {
        "t": "res",
        "id": inv["id"],
        "status": result["status"],
        "headers": result["headers"],
        "body": result["body"],
    }


def error_reply(inv: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    error_id = secrets.token_hex(6)
    details = user_paths(traceback.format_exc())
    print(
        f"error {error_id} in request {inv.get('request_id', '-')}:\n{details}",
        file=sys.stderr,
        end="",
        flush=True,
    )
    if "event" in inv:
        # A direct invocation is answered as Lambda answers it: the error payload, flagged.
        fields = direct.error_fields(exc)
        fields["errorMessage"] = fields["errorMessage"][:_MAX_ERROR]
        return {
            "t": "res",
            "id": inv["id"],
            "status": 200,
            "headers": [
                *direct.JSON,
                ["x-amz-function-error", "Unhandled"],
                ["x-hourai-error-id", error_id],
            ],
            "body": json.dumps(fields).encode(),
        }
    error = f"{type(exc).__name__}: {exc}"
    if len(error) > _MAX_ERROR:
        error = error[: _MAX_ERROR - 1] + "…"
    return {"t": "err", "id": inv["id"], "error_id": error_id, "error": error}


def serve_worker_concurrent(
    sock: socket.socket,
    invoker: Invoker,
    concurrency: int,
    imports: learn.ImportWatch | None = None,
) -> None:
    """Thread mode: up to `concurrency` invocations at once on this worker's own loop."""
    loop = getattr(invoker, "loop", None) or new_event_loop()
    asyncio.set_event_loop(loop)
    loop.set_default_executor(
        ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="invocation")
    )
    me = os.getpid()
    closed: asyncio.Future[None] = loop.create_future()
    tasks: set[asyncio.Task[None]] = set()
    outlets: dict[int, ChannelOutlet] = {}
    loop_thread = threading.get_ident()

    def send(msg: Message) -> None:
        # A sync function streams from its pool thread; the channel belongs to the loop,
        # whose callbacks run in order, so the frames keep theirs.
        if threading.get_ident() == loop_thread:
            channel.send(msg)
        else:
            loop.call_soon_threadsafe(channel.send, msg)

    debug = False

    async def handle(inv: dict[str, Any]) -> None:
        # Each task has a context of its own, so this marks only this invocation's lines.
        if debug:
            debugging.busy(1)
        outlet = None
        if "stream" in inv and invoker.kind != "handler":
            outlet = outlets[inv["id"]] = ChannelOutlet(inv["id"], inv["stream"], send)
        try:
            reply = await run_invocation_async(invoker, inv, outlet)
        finally:
            if debug:
                debugging.busy(-1)
        if os.getpid() != me:
            os._exit(0)  # a fork of the function's, see _ProcessWorker.answer
        outlets.pop(inv["id"], None)
        if outlet is not None and outlet.started:
            finish_stream(channel.send, outlet, reply)
        else:
            send_reply(channel, inv, reply)
        report_imports(send, imports)

    def on_message(msg: dict[str, Any], _fds: list[int]) -> None:
        if msg["t"] == "inv":
            task = loop.create_task(handle(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif msg["t"] == "debug":
            nonlocal debug
            debug = True
            if imports is not None:
                imports.left = 0  # debugpy is the debugger's import, not the function's
            channel.send(debugging.start(msg))
        elif msg["t"] == "cancel":
            outlet = outlets.get(msg.get("id"))  # type: ignore[arg-type]
            if outlet is not None:
                outlet.cancel()

    def on_close(_reason: str) -> None:
        if not closed.done():
            closed.set_result(None)

    channel = AsyncChannel(loop, sock, on_message, on_close)
    loop.run_until_complete(closed)
