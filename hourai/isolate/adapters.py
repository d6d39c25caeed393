"""Invokers: one invocation message in, one response out, for each kind of function.

Every invoker turns an ``inv`` message (see :mod:`hourai.protocol`) into a call of the
tenant's function and returns ``{"status": int, "headers": [[name, value], ...], "body":
bytes}``. Exceptions raised by the function propagate to the caller, which owns error reporting.

Life of an invoker, in the process that holds it:

1. ``startup()`` in the function's snapshot, once, before any fork. Only ASGI does anything
   here: it runs the app's lifespan startup, so connection pools and caches built there are
   inherited by every worker.
2. ``after_fork()`` in each worker, first thing after the fork. The snapshot's event loop must
   never run in a worker: its epoll instance is shared with the snapshot and every sibling, so
   the worker gets a fresh loop, and the inherited one is kept referenced but never touched
   (closing it would unregister the snapshot's fds from the shared epoll instance).
3. ``invoke()`` per request in ``process`` isolation; ``invoke_async()`` on the worker's own
   event loop in ``thread`` isolation, where many invocations of async code run at once.

Given an :class:`Outlet` (the caller takes a streaming response), ASGI and WSGI invokers
stream what the app produces as it comes: an ASGI body message with ``more_body``, or a WSGI
iterable that is neither a list nor a tuple and whose headers set no Content-Length (Flask's
ordinary answers say their length: they stay one frame). The invoker then returns the rest
of the body. Handlers never stream (Lambda's buffered semantics), nor does a HEAD request:
its head goes out at the app's first chunk and the app is stopped.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import os
import sys
import traceback
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import unquote_to_bytes

from hourai.isolate.lambda_event import (
    DEFAULT_MEMORY_MB,
    Invocation,
    LambdaContext,
    Response,
    build_event,
    decoded_path,
    infer_response,
    path_bytes,
)

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency, but the runtime works without it
    uvloop = None  # type: ignore[assignment]

T = TypeVar("T")

ASGI_VERSION = {"version": "3.0", "spec_version": "2.3"}
LIFESPAN_TIMEOUT = 30.0


class Outlet:
    """Where a streaming response goes as the app produces it (the worker's channel).

    ``head`` once (status, headers, the body so far), then ``chunk`` per piece; each may
    block while the client is slow. ``cancelled`` turns true when the client has gone, and
    ``on_cancel`` (if set) is called then, from the thread that learnt it."""

    __slots__ = ("cancelled", "on_cancel", "started")

    def __init__(self) -> None:
        self.started = False
        self.cancelled = False
        self.on_cancel: Callable[[], None] | None = None

    def head(self, status: int, headers: list[list[str]], body: bytes) -> None:
        raise NotImplementedError

    def chunk(self, body: bytes) -> None:
        raise NotImplementedError

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            if self.on_cancel is not None:
                self.on_cancel()

    def cancel_fd(self) -> int | None:
        """An fd that turns readable when a cancel may have come, for an event loop to watch
        between chunks (then :meth:`check_cancel`); None: the cancel comes by itself."""
        return None

    def check_cancel(self) -> None:
        """Look for a cancel now (see :meth:`cancel_fd`)."""


class ClientGone(OSError):
    """Raised in an ASGI app's ``send`` once its client has gone (as uvicorn does)."""


@runtime_checkable
class Invoker(Protocol):
    """What the snapshot and the worker call; see the module docstring for the life cycle."""

    kind: str  # "handler" | "asgi" | "wsgi"
    attr: str  # the attribute of the module that is called
    is_async: bool  # coroutine function or ASGI app: can run many at once on one event loop

    def startup(self) -> None: ...

    def after_fork(self) -> None: ...

    def invoke(self, inv: Invocation, outlet: Outlet | None = None) -> Response: ...

    async def invoke_async(self, inv: Invocation, outlet: Outlet | None = None) -> Response: ...


class StartupError(Exception):
    """The function's startup (ASGI lifespan) failed; ``str()`` is one line for the user."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details or message


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop, uvloop's when it is installed (lower per-request overhead)."""
    if uvloop is not None:
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


# Loops inherited across a fork. Referenced for the life of the process so that garbage
# collection never closes them: BaseEventLoop.__del__ would close an unclosed loop, and closing
# unregisters its fds from the epoll instance the snapshot still uses.
_inherited_loops: list[Any] = []


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _strip_head(inv: Invocation, response: Response) -> Response:
    # A HEAD response carries the GET's headers but never a body, whatever the app produced.
    if inv["method"] == "HEAD":
        response["body"] = b""
    return response


class _LoopOwner:
    """The per-process event loop that ``invoke()`` runs async code on."""

    _loop: asyncio.AbstractEventLoop | None = None
    _loop_pid: int = 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """This process's loop for the function, created on first use and after every fork."""
        if self._loop is None or self._loop_pid != os.getpid():
            self._new_loop()
        assert self._loop is not None
        return self._loop

    def _new_loop(self) -> None:
        if self._loop is not None:
            _inherited_loops.append(self._loop)
        self._loop = new_event_loop()
        self._loop_pid = os.getpid()
        # Libraries that call asyncio.get_event_loop() outside a coroutine must get this loop,
        # not the snapshot's.
        asyncio.set_event_loop(self._loop)

    def after_fork(self) -> None:
        """Give this worker its own event loop (the inherited one is never run again).

        Without an inherited loop (sync handlers, async ones not yet called) there is nothing
        to replace, and the loop is made on first use: creating one costs a few hundred
        microseconds, which a fork path measured in milliseconds should not pay for nothing.
        """
        if self._loop is not None:
            self._new_loop()


class HandlerInvoker(_LoopOwner):
    """A Lambda-style ``handler(event, context)`` or ``handler(event)``, sync or async."""

    kind = "handler"

    def __init__(
        self,
        fn: Callable[..., Any],
        attr: str,
        *,
        is_async: bool,
        takes_context: bool,
        memory_limit_mb: int | None = None,
    ) -> None:
        self.fn = fn
        self.attr = attr
        self.is_async = is_async
        self.takes_context = takes_context
        if memory_limit_mb is None:
            # The Lambda runtime reads the same variable; a deployment may set it.
            env = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "")
            memory_limit_mb = int(env) if env.isdigit() else DEFAULT_MEMORY_MB
        self.memory_limit_mb = memory_limit_mb

    def startup(self) -> None:
        """Nothing to do: module-level code already ran at import."""

    def _call(self, inv: Invocation, event: Any = None) -> Any:
        if event is None:
            event = build_event(inv)
        if self.takes_context:
            return self.fn(event, LambdaContext(inv, self.memory_limit_mb))
        return self.fn(event)

    def call_event(self, event: Any, inv: Invocation) -> Any:
        """A direct invocation: ``event`` as the caller gave it; the raw return value."""
        result = self._call(inv, event)
        if inspect.isawaitable(result):
            result = self.loop.run_until_complete(_await(result))
        return result

    async def call_event_async(self, event: Any, inv: Invocation) -> Any:
        if self.is_async:
            result = self._call(inv, event)
            return await result if inspect.isawaitable(result) else result
        return await in_thread(self.call_event, event, inv)

    def invoke(self, inv: Invocation, outlet: Outlet | None = None) -> Response:
        """One invocation; an async handler runs on this process's loop, one at a time.
        (A handler's answer is buffered whole, as Lambda's is: ``outlet`` is not used.)"""
        result = self._call(inv)
        if inspect.isawaitable(result):
            result = self.loop.run_until_complete(_await(result))
        return _strip_head(inv, infer_response(result))

    async def invoke_async(self, inv: Invocation, outlet: Outlet | None = None) -> Response:
        if self.is_async:
            result = self._call(inv)
            if inspect.isawaitable(result):
                result = await result
            return _strip_head(inv, infer_response(result))
        # Sync code must not block the loop that serves the other invocations.
        return await in_thread(self.invoke, inv)


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the loop's pool (thread mode: the worker's N threads), in a copy of
    the calling task's context. ``loop.run_in_executor`` alone carries no contextvars, and
    the invocation's log mark and its OpenTelemetry context are contextvars: without the
    copy a sync function's lines would be unmarked and its spans without a parent."""
    return await asyncio.to_thread(fn, *args)


# ---------------------------------------------------------------------------------------------
# WSGI (PEP 3333)


def build_environ(inv: Invocation, *, multithread: bool = False) -> dict[str, Any]:
    """The PEP 3333 environ for one invocation."""
    body: bytes = inv.get("body") or b""
    root_path: str = inv.get("root_path", "")
    query: str = inv.get("query", "")
    client = inv.get("client") or ["", 0]
    server = inv.get("server") or ["localhost", 80]
    raw_uri = root_path + inv["path"] + (f"?{query}" if query else "")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": inv["method"],
        "SCRIPT_NAME": root_path,
        # PEP 3333: PATH_INFO is the percent-decoded path, its bytes carried as latin-1.
        "PATH_INFO": unquote_to_bytes(path_bytes(inv["path"])).decode("latin-1"),
        "QUERY_STRING": query,
        "RAW_URI": raw_uri,
        "REQUEST_URI": raw_uri,
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": f"HTTP/{inv.get('http_version', '1.1')}",
        "REMOTE_ADDR": str(client[0]),
        "REMOTE_PORT": str(client[1]),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": inv.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body),
        # The whole body is in wsgi.input and ends there, even when the client sent it chunked.
        "wsgi.input_terminated": True,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": multithread,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    has_length = bool(body)
    for name, value in inv.get("headers", ()):
        if "_" in name:
            # x_forwarded_for and x-forwarded-for would both become HTTP_X_FORWARDED_FOR; a
            # client could forge a header a proxy set. Drop them, as gunicorn does.
            continue
        key = name.upper().replace("-", "_")
        if key == "CONTENT_TYPE":
            environ["CONTENT_TYPE"] = value
            continue
        if key == "CONTENT_LENGTH":
            has_length = True
            continue
        key = f"HTTP_{key}"
        if key in environ:
            sep = "; " if key == "HTTP_COOKIE" else ","
            environ[key] = f"{environ[key]}{sep}{value}"
        else:
            environ[key] = value
    if has_length:
        # The ingress has read the whole body, so its length is known exactly.
        environ["CONTENT_LENGTH"] = str(len(body))
    return environ


def _status_code(status: str) -> int:
    code = status.split(" ", 1)[0]
    if len(code) != 3 or not code.isdigit():
        raise ValueError(f"WSGI app gave status {status!r}; it must look like '200 OK'")
    return int(code)


class WsgiInvoker:
    """A WSGI application (Flask, Django, any ``app(environ, start_response)``)."""

    kind = "wsgi"
    is_async = False

    def __init__(
        self, app: Callable[..., Iterable[bytes]], attr: str, *, multithread: bool = False
    ) -> None:
        self.app = app
        self.attr = attr
        self.multithread = multithread

    def startup(self) -> None:
        """Nothing to do: WSGI has no startup protocol; module-level code already ran."""

    def after_fork(self) -> None:
        """Nothing to do: WSGI holds no per-process state of ours."""

    def invoke(self, inv: Invocation, outlet: Outlet | None = None) -> Response:
        environ = build_environ(inv, multithread=self.multithread)
        status: str | None = None
        headers: list[list[str]] = []
        chunks: list[bytes] = []
        headers_sent = False

        def write(data: bytes) -> None:
            nonlocal headers_sent
            if not isinstance(data, bytes | bytearray):
                raise TypeError(f"WSGI app wrote {type(data).__name__}; the body must be bytes")
            if not data:
                return
            if status is None:
                raise RuntimeError("WSGI app produced a body before calling start_response()")
            headers_sent = True
            chunks.append(bytes(data))

        def start_response(
            new_status: str, new_headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], None]:
            nonlocal status, headers
            if exc_info is not None:
                try:
                    if headers_sent:
                        # PEP 3333: too late to change the response, so re-raise the error.
                        raise exc_info[1].with_traceback(exc_info[2])
                finally:
                    exc_info = None
            elif status is not None:
                raise RuntimeError("WSGI app called start_response() twice without exc_info")
            status = new_status
            headers = [[str(k), str(v)] for k, v in new_headers]
            return write

        result = self.app(environ, start_response)
        streaming = outlet is not None and not isinstance(result, list | tuple)
        try:
            for chunk in result:
                write(chunk)
                if not streaming or not chunks:
                    continue
                assert outlet is not None and status is not None
                if not outlet.started:
                    if any(k.lower() == "content-length" for k, _ in headers):
                        streaming = False  # its length is known: one frame
                        continue
                    body = b"" if inv["method"] == "HEAD" else b"".join(chunks)
                    chunks.clear()
                    outlet.head(_status_code(status), headers, body)
                    if inv["method"] == "HEAD":
                        break
                else:
                    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                    chunks.clear()
                    outlet.chunk(body)
                if outlet.cancelled:
                    break
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if status is None:
            raise RuntimeError("WSGI app returned without calling start_response()")
        return _strip_head(
            inv, {"status": _status_code(status), "headers": headers, "body": b"".join(chunks)}
        )

    async def invoke_async(self, inv: Invocation, outlet: Outlet | None = None) -> Response:
        # WSGI is synchronous: run it on a thread so the loop keeps serving other invocations.
        return await in_thread(self.invoke, inv, outlet)


# ---------------------------------------------------------------------------------------------
# ASGI 3


def _latin1(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes | bytearray) else str(value)


def build_scope(inv: Invocation, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ASGI 3 HTTP connection scope for one invocation.

    ``path`` and ``raw_path`` include ``root_path``, as uvicorn sends them and as Starlette's
    routing expects (it strips ``root_path`` itself).
    """
    root_path: str = inv.get("root_path", "")
    raw_path = path_bytes(root_path + inv["path"])
    client = inv.get("client")
    server = inv.get("server")
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": dict(ASGI_VERSION),
        "http_version": inv.get("http_version", "1.1"),
        "method": inv["method"],
        "scheme": inv.get("scheme", "http"),
        "path": decoded_path(root_path + inv["path"]),
        "raw_path": raw_path,
        "query_string": path_bytes(inv.get("query", "")),
        "root_path": root_path,
        "headers": [
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in inv.get("headers", ())
        ],
        "client": (client[0], client[1]) if client else None,
        "server": (server[0], server[1]) if server else None,
    }
    if state is not None:
        # Each request gets a shallow copy, as uvicorn does, so one request's additions do not
        # leak into the next.
        scope["state"] = dict(state)
    return scope


class AsgiInvoker(_LoopOwner):
    """An ASGI 3 application (FastAPI, Starlette, any ``async app(scope, receive, send)``)."""

    kind = "asgi"
    is_async = True

    def __init__(
        self,
        app: Callable[..., Awaitable[None]],
        attr: str,
        *,
        lifespan_timeout: float = LIFESPAN_TIMEOUT,
    ) -> None:
        self.app = app
        self.attr = attr
        self.lifespan_timeout = lifespan_timeout
        # None until startup() ran and the app supports lifespan; then the lifespan state.
        self.state: dict[str, Any] | None = None
        self._lifespan_task: asyncio.Task[None] | None = None
        self._lifespan_shutdown: asyncio.Event | None = None
        self._lifespan_done: asyncio.Future[tuple[Any, ...]] | None = None

    # -- lifespan -------------------------------------------------------------------------

    def startup(self) -> None:
        """Run the lifespan startup on this process's loop and leave the lifespan suspended.

        Raises :class:`StartupError` if the app reports ``lifespan.startup.failed``, raises
        after it received ``lifespan.startup``, or does not finish in ``lifespan_timeout``.
        An app that raises or returns before reading the startup message does not speak the
        lifespan protocol; that is fine, and requests are served without lifespan state.
        """
        self.loop.run_until_complete(self._startup())

    async def _startup(self) -> None:
        loop = asyncio.get_running_loop()
        state: dict[str, Any] = {}
        scope = {"type": "lifespan", "asgi": dict(ASGI_VERSION), "state": state}
        started: asyncio.Future[tuple[Any, ...]] = loop.create_future()
        self._lifespan_done = loop.create_future()
        self._lifespan_shutdown = asyncio.Event()
        received_startup = False

        async def receive() -> dict[str, Any]:
            nonlocal received_startup
            if not received_startup:
                received_startup = True
                return {"type": "lifespan.startup"}
            assert self._lifespan_shutdown is not None
            # Suspends here for the life of the snapshot; a worker never resumes it.
            await self._lifespan_shutdown.wait()
            return {"type": "lifespan.shutdown"}

        async def send(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind in ("lifespan.startup.complete", "lifespan.startup.failed"):
                if not started.done():
                    started.set_result((kind, message.get("message", "")))
            elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                if self._lifespan_done is not None and not self._lifespan_done.done():
                    self._lifespan_done.set_result((kind, message.get("message", "")))
            else:
                raise RuntimeError(f"ASGI app sent {kind!r} on the lifespan scope")

        async def main() -> None:
            try:
                await self.app(scope, receive, send)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # the app's failure is reported, not raised here
                outcome = ("raised", exc, received_startup, traceback.format_exc())
                if not started.done():
                    started.set_result(outcome)
                elif self._lifespan_done is not None and not self._lifespan_done.done():
                    self._lifespan_done.set_result(outcome)
            else:
                if not started.done():
                    started.set_result(("returned",))
                if self._lifespan_done is not None and not self._lifespan_done.done():
                    self._lifespan_done.set_result(("returned",))

        task = loop.create_task(main(), name="hourai-lifespan")
        try:
            outcome = await asyncio.wait_for(asyncio.shield(started), self.lifespan_timeout)
        except TimeoutError:
            task.cancel()
            raise StartupError(
                f"lifespan startup did not finish within {self.lifespan_timeout:g} s"
            ) from None
        kind = outcome[0]
        if kind == "lifespan.startup.complete":
            self._lifespan_task = task
            self.state = state
        elif kind == "lifespan.startup.failed":
            raise StartupError(_one_line(f"lifespan startup failed: {outcome[1] or 'no message'}"))
        elif kind == "raised" and outcome[2]:
            exc = outcome[1]
            raise StartupError(
                _one_line(f"lifespan startup raised {type(exc).__name__}: {exc}"), outcome[3]
            )
        # Otherwise the app raised or returned before reading lifespan.startup: it has no
        # lifespan support, and requests run without lifespan state.

    def shutdown(self, timeout: float = LIFESPAN_TIMEOUT) -> None:
        """Run the lifespan shutdown, in the process that ran ``startup()`` (tests, local runs).

        Workers never call this: their lifespan belongs to the snapshot.
        """
        if self._lifespan_task is None or self._loop_pid != os.getpid():
            return
        assert self._lifespan_shutdown is not None and self._lifespan_done is not None
        self._lifespan_shutdown.set()
        done = self._lifespan_done

        async def wait() -> tuple[Any, ...]:
            return await asyncio.wait_for(asyncio.shield(done), timeout)

        try:
            outcome = self.loop.run_until_complete(wait())
        finally:
            self._lifespan_task = None
        if outcome[0] == "lifespan.shutdown.failed":
            raise RuntimeError(_one_line(f"lifespan shutdown failed: {outcome[1]}"))
        if outcome[0] == "raised":
            raise RuntimeError(_one_line(f"lifespan shutdown raised {outcome[1]!r}"))

    # -- requests -------------------------------------------------------------------------

    def invoke(self, inv: Invocation, outlet: Outlet | None = None) -> Response:
        """One invocation on this process's loop; one caller at a time (``process`` mode)."""
        return self.loop.run_until_complete(self.invoke_async(inv, outlet))

    async def invoke_async(self, inv: Invocation, outlet: Outlet | None = None) -> Response:
        scope = build_scope(inv, self.state)
        body: bytes = inv.get("body") or b""
        request_sent = False
        complete = asyncio.Event()
        status: int | None = None
        headers: list[list[str]] = []
        chunks: list[bytes] = []

        stopped = False
        watched: int | None = None

        def watch() -> None:
            # An app idle between events (a heartbeat every 30 s) learns of its client's
            # leaving at once, from its disconnect listener, not at its next send.
            nonlocal watched
            assert outlet is not None
            # Cancels come on this loop's thread (this loop reads the channel, or watches it).
            outlet.on_cancel = stop
            watched = outlet.cancel_fd()
            if watched is not None:
                asyncio.get_running_loop().add_reader(watched, outlet.check_cancel)

        def stop() -> None:
            # The app is told as uvicorn tells it: a disconnect from receive(), and sends
            # that raise; Starlette's StreamingResponse listens for the former.
            nonlocal stopped
            stopped = True
            complete.set()

        async def receive() -> dict[str, Any]:
            nonlocal request_sent
            if not request_sent:
                request_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            # The client is gone only once the response is complete; answering "disconnect"
            # earlier would make Starlette abort a streaming response (ASGI spec < 2.4).
            await complete.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status, headers
            kind = message["type"]
            if kind == "http.response.start":
                if status is not None:
                    raise RuntimeError("ASGI app sent 'http.response.start' twice")
                status = int(message["status"])
                headers = [[_latin1(k), _latin1(v)] for k, v in message.get("headers", ())]
            elif kind == "http.response.body":
                if status is None:
                    raise RuntimeError("ASGI app sent 'http.response.body' before the start")
                if outlet is not None and (outlet.cancelled or stopped):
                    raise ClientGone("the client has gone")
                if complete.is_set():
                    raise RuntimeError("ASGI app sent a body after the response was complete")
                chunk = message.get("body", b"")
                if chunk:
                    chunks.append(bytes(chunk))
                more = message.get("more_body", False)
                if not more:
                    complete.set()
                elif outlet is not None and (chunks or outlet.started):
                    if not outlet.started:
                        watch()
                    self._stream(inv, outlet, status, headers, chunks)
                    if outlet.cancelled or inv["method"] == "HEAD":
                        stop()
            else:
                raise RuntimeError(f"ASGI app sent {kind!r}, which is not an HTTP response message")

        try:
            await self.app(scope, receive, send)
        except Exception:
            if not stopped:
                raise  # otherwise: the app ended on its client's leaving, which is no error
        finally:
            if watched is not None:
                asyncio.get_running_loop().remove_reader(watched)
            # Release any task still waiting in receive() (a disconnect listener).
            complete.set()
        if status is None:
            raise RuntimeError("ASGI app returned without sending a response")
        if stopped:
            chunks.clear()
        return _strip_head(inv, {"status": status, "headers": headers, "body": b"".join(chunks)})

    @staticmethod
    def _stream(
        inv: Invocation,
        outlet: Outlet,
        status: int | None,
        headers: list[list[str]],
        chunks: list[bytes],
    ) -> None:
        assert status is not None
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if not outlet.started:
            outlet.head(status, headers, b"" if inv["method"] == "HEAD" else body)
        else:
            outlet.chunk(body)
