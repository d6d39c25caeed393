"""``hourai debug NAME``: one fresh worker of the function, a debugger's, until it detaches.

A session forks a worker of its own from the function's snapshot, beside the scheduler's
pool and unknown to the scheduler (its worker ids are negative), and asks it to open a
debugpy listener on loopback (hourai.isolate.debugging). From then on the function's
requests go to that worker, one at a time, in arrival order, instead of the scheduler: no
other request ever runs in a process someone is stepping through, and no request of the
function runs elsewhere while the session is open, so the request you send is the one that
stops at your breakpoint. The scheduler's timeouts do not reach these requests: a request
held at a breakpoint is not killed under the debugger.

The session ends when the debugger detaches (the worker exits after the request it is
running, and is never reused), when the worker dies, on ``hourai debug NAME --stop``, or
when the function is removed; requests then go to the scheduler again.

Breakpoints: the worker runs the code store's copy of the function (``code_root``), not
the directory it was deployed from (``source_root``). Tracebacks show the deployed paths
(hourai.isolate.tracebacks); for breakpoints the debugger is told the mapping with the
standard ``pathMappings`` of its attach configuration (``localRoot``: the deployed
directory, ``remoteRoot``: the code root), which ``hourai debug`` prints ready to paste.
Mapping in the debugger, rather than rewriting code objects' file names in the worker,
keeps the snapshot's code untouched and works the same for every DAP client.

Who may open a session: whoever may use the control socket, that is the operator. The
listener itself is a loopback TCP port without authentication (debugpy has none for its
clients), open only while the session is: on a host shared with untrusted local users,
open sessions only on a port they cannot reach first, or not at all.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hourai.ingress import error_response
from hourai.protocol import Violation

if TYPE_CHECKING:
    from hourai.daemon import Pending, Runtime, WorkerProc

log = logging.getLogger("hourai.debug")

DEFAULT_PORT = 5678  # VS Code's default for a Python remote attach
START_TIMEOUT = 30.0

_wids = itertools.count(-1, -1)


class DebugError(Exception):
    pass


def debugpy_path() -> str:
    """The directory hourai's own debugpy is imported from (for the worker's sys.path)."""
    spec = importlib.util.find_spec("debugpy")
    if spec is None or not spec.submodule_search_locations:
        raise DebugError("debugpy is not installed beside hourai (pip install debugpy)")
    return os.path.dirname(next(iter(spec.submodule_search_locations)))


@dataclass(eq=False)
class Session:
    function: str
    version: str
    wid: int
    port: int
    worker: WorkerProc | None = None
    ready: asyncio.Future[dict[str, Any]] | None = None
    queue: deque[Pending] = field(default_factory=deque)
    current: Pending | None = None
    started: float = field(default_factory=time.time)
    info: dict[str, Any] = field(default_factory=dict)


class Debugger:
    """The daemon's debug sessions, one per function at most."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.sessions: dict[str, Session] = {}
        self.by_wid: dict[int, Session] = {}

    async def open(self, name: str, port: int = DEFAULT_PORT) -> dict[str, Any]:
        from hourai.daemon import WorkerProc

        rt = self.runtime
        spec = rt.functions.get(name)
        if spec is None:
            raise DebugError(f"no function {name}")
        if name in self.sessions:
            raise DebugError(f"{name} already has a debug session (hourai debug {name} --stop)")
        version = rt.versions.get((name, spec.version))
        if version is None or version.handle is None:
            rt.prewarm(name)
            deadline = rt.loop.time() + START_TIMEOUT
            while (version is None or version.handle is None) and rt.loop.time() < deadline:
                await asyncio.sleep(0.05)
                version = rt.versions.get((name, spec.version))
            if version is None or version.handle is None:
                raise DebugError(f"{name}: its snapshot could not be built")
        if version.built is not None:
            try:
                await asyncio.shield(version.built)
            except Exception as exc:  # the build's failure, as the deploy saw it
                raise DebugError(f"{name}: its snapshot could not be built: {exc}") from None
        path = debugpy_path()
        session = Session(name, spec.version, next(_wids), port, ready=rt.loop.create_future())
        self.sessions[name] = session
        self.by_wid[session.wid] = session
        worker = WorkerProc(session.wid, name, spec.version)
        session.worker = worker
        rt.workers[session.wid] = worker
        assert version.handle is not None
        version.handle.fork(session.wid)
        try:
            assert session.ready is not None
            answer = await asyncio.wait_for(asyncio.shield(session.ready), START_TIMEOUT)
            if worker.channel is None:
                raise DebugError("the debug worker did not start")
            session.ready = replied = rt.loop.create_future()
            worker.channel.send({"t": "debug", "port": port, "path": path})
            reply = await asyncio.wait_for(asyncio.shield(replied), START_TIMEOUT)
        except (TimeoutError, DebugError, asyncio.CancelledError) as exc:
            self.close(name, "could not start")
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise DebugError(f"{name}: the debug worker did not start: {exc}") from None
        del answer
        if "error" in reply:
            self.close(name, "debugpy failed")
            raise DebugError(f"{name}: debugpy could not listen on port {port}: {reply['error']}")
        session.info = {
            "function": name,
            "version": spec.version,
            "host": reply["host"],
            "port": reply["port"],
            "pid": worker.pid,
            "code_root": spec.target.root,
            "source_root": spec.source_root or spec.target.root,
        }
        log.warning(
            "%s: debug session on %s:%s (worker %s); its requests go to it until it detaches",
            name,
            reply["host"],
            reply["port"],
            worker.pid,
        )
        return session.info

    # -- from the runtime

    def forked(self, worker: WorkerProc) -> None:
        session = self.by_wid.get(worker.wid)
        if session is not None and session.ready is not None and not session.ready.done():
            session.ready.set_result({})

    def fork_failed(self, wid: int, error: str) -> None:
        session = self.by_wid.get(wid)
        if session is not None and session.ready is not None and not session.ready.done():
            session.ready.set_exception(DebugError(error))

    def message(self, worker: WorkerProc, msg: dict[str, Any]) -> bool:
        """A frame only a debug worker sends; True if it was one."""
        if msg.get("t") != "debugging":
            return False
        # From tenant code's process like any frame: only these shapes are taken.
        if not (
            (set(msg) == {"t", "error"} and type(msg["error"]) is str and len(msg["error"]) < 4096)
            or (
                set(msg) == {"t", "host", "port", "pid"}
                and type(msg["host"]) is str
                and len(msg["host"]) < 256
                and type(msg["port"]) is int
                and type(msg["pid"]) is int
            )
        ):
            raise Violation("debugging frame: {host, port, pid} or {error} expected")
        session = self.by_wid.get(worker.wid)
        if session is not None and session.ready is not None and not session.ready.done():
            session.ready.set_result(msg)
        return True

    def take(self, pending: Pending) -> bool:
        """Route a request of the function to its session; False: there is none (ready)."""
        session = self.sessions.get(pending.spec.name)
        if session is None or not session.info:
            return False
        session.queue.append(pending)
        self._next(session)
        return True

    def finished(self, worker: WorkerProc) -> None:
        session = self.by_wid.get(worker.wid)
        if session is not None:
            session.current = None
            self._next(session)

    def worker_gone(self, worker: WorkerProc) -> None:
        session = self.by_wid.get(worker.wid)
        if session is not None:
            self.close(session.function, "the debugger detached")

    def _next(self, session: Session) -> None:
        worker = session.worker
        if session.current is not None or worker is None or worker.channel is None:
            return
        rt = self.runtime
        while session.queue:
            pending = session.queue.popleft()
            if pending.rid not in rt.pending:
                continue  # its client went away while it waited
            session.current = pending
            pending.start = "debug"
            pending.wid = worker.wid
            rt._send_invocation(pending, worker)
            return

    def close(self, name: str, reason: str) -> bool:
        session = self.sessions.pop(name, None)
        if session is None:
            return False
        self.by_wid.pop(session.wid, None)
        rt = self.runtime
        log.warning("%s: debug session ended (%s)", name, reason)
        worker = session.worker
        waiting = list(session.queue)
        if session.current is not None:
            waiting.insert(0, session.current)
        if worker is not None:
            for pending in list(worker.inflight.values()):
                if pending not in waiting:
                    waiting.append(pending)
            worker.inflight.clear()
            if not worker.killed:
                rt._kill_worker(worker, f"debug session ended: {reason}")
            rt.workers.pop(worker.wid, None)
        for pending in waiting:
            if pending.rid not in rt.pending:
                continue
            if pending is session.current or pending.wid == session.wid:
                rt._answer(
                    pending,
                    error_response(502, f"the debug session of {name} ended: {reason}"),
                )
            else:
                # never started: the scheduler takes it as if it had just arrived
                pending.start = "-"
                pending.wid = None
                rt._apply(rt.scheduler.submit(pending.rid, name))
        if session.ready is not None and not session.ready.done():
            session.ready.set_exception(DebugError(reason))
            session.ready.exception()
        return True

    def stop_all(self) -> None:
        for name in list(self.sessions):
            self.close(name, "hourai is stopping")
