"""The daemon's side of the zygotes: start the root zygote, build snapshots, fork workers.

Everything here runs on the daemon's event loop and never forks tenant code itself (a
process with an event loop is unsafe to fork); it only sends commands to the zygotes and
turns their replies into callbacks. Worker channels arrive as socketpair ends passed with
SCM_RIGHTS and are wrapped in :class:`AsyncChannel`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hourai.channel import AsyncChannel
from hourai.protocol import Message

log = logging.getLogger("hourai.snapshot")


class OutputReader:
    """Reads a child's stdout/stderr pipe and hands over whole lines, tagged."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, fd: int, tag: str, sink: Callable[[str, str], None]
    ) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.tag = tag
        self.sink = sink
        self._loop = loop
        self._partial = b""
        loop.add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        *lines, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > 65536:  # a runaway line without newline: flush it anyway
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            self.sink(self.tag, line.decode("utf-8", "replace"))

    def close(self) -> None:
        if self.fd < 0:
            return
        if self._partial:
            self.sink(self.tag, self._partial.decode("utf-8", "replace"))
            self._partial = b""
        self._loop.remove_reader(self.fd)
        os.close(self.fd)
        self.fd = -1


class SnapshotFailed(Exception):
    """The function could not be imported or initialised; ``details`` holds the traceback."""

    def __init__(self, error: str, details: str = "") -> None:
        super().__init__(error)
        self.details = details


@dataclass
class ExitStatus:
    code: int | None
    signal: int | None

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"killed by {name}"
        return f"exited with status {self.code}"


@dataclass
class WorkerEvents:
    """What a snapshot tells its owner about the workers it forks."""

    forked: Callable[[int, int, socket.socket, int], None]  # wid, pid, channel, output fd
    fork_failed: Callable[[int, str], None]  # wid, error
    exited: Callable[[int, ExitStatus], None]  # wid, status


@dataclass
class SnapshotHandle:
    """The daemon's view of one function snapshot process."""

    fid: str
    events: WorkerEvents
    ready: asyncio.Future[dict[str, Any]]
    pid: int | None = None
    channel: AsyncChannel | None = None
    output: OutputReader | None = None
    info: dict[str, Any] = field(default_factory=dict)
    on_lost: Callable[[str], None] | None = None
    stopping: bool = False

    def fork(self, wid: int) -> None:
        if self.channel is None or self.channel.closed:
            self.events.fork_failed(wid, "snapshot is gone")
            return
        self.channel.send({"t": "fork", "wid": wid})

    def stop(self) -> None:
        """Ask the snapshot to kill its workers and exit; its channel closing does the rest."""
        self.stopping = True
        if self.channel is not None and not self.channel.closed:
            self.channel.send({"t": "stop"})

    def kill(self) -> None:
        self.stopping = True
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # -- messages from the snapshot process
    def _on_message(self, msg: Message, fds: list[int]) -> None:
        kind = msg["t"]
        if kind == "forked":
            chan_fd, out_fd, pidfd = fds
            try:
                pid = pid_of(pidfd)
            finally:
                os.close(pidfd)
            self.events.forked(msg["wid"], pid, socket.socket(fileno=chan_fd), out_fd)
        elif kind == "exited":
            self.events.exited(msg["wid"], ExitStatus(msg["code"], msg["signal"]))
        elif kind == "fork_failed":
            self.events.fork_failed(msg["wid"], msg["error"])
        elif kind == "ready":
            self.info = msg
            if not self.ready.done():
                self.ready.set_result(msg)
        elif kind == "failed":
            if not self.ready.done():
                self.ready.set_exception(SnapshotFailed(msg["error"], msg.get("details", "")))
        else:
            for fd in fds:
                os.close(fd)
            log.warning("snapshot %s sent unknown message %r", self.fid, kind)

    def _on_close(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(
                SnapshotFailed(f"snapshot process ended during start ({reason})")
            )
        elif (
            not self.ready.cancelled()
            and self.ready.exception() is None
            and not self.stopping
            and self.on_lost is not None
        ):
            self.on_lost(reason)


class RootZygote:
    """The root zygote process and the snapshots forked from it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        preloads: Sequence[str] = (),
        output_sink: Callable[[str, str], None],
        immortalize: bool = True,
    ) -> None:
        self.loop = loop
        self.preloads = list(preloads)
        self.immortalize = immortalize
        self.output_sink = output_sink
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: AsyncChannel | None = None
        self._hello: asyncio.Future[int] = loop.create_future()
        self._by_fid: dict[str, SnapshotHandle] = {}
        self._by_pid: dict[int, SnapshotHandle] = {}
        self.on_lost: Callable[[str], None] | None = None

    async def start(self, timeout: float = 30.0) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cmd = [sys.executable, "-m", "hourai.snapshot.zygote", "--channel", str(theirs.fileno())]
        for mod in self.preloads:
            cmd += ["--preload", mod]
        if not self.immortalize:
            cmd.append("--mortal")
        # The root zygote inherits the daemon's stdout/stderr: its own messages (a failed
        # preload) belong in the daemon's log.
        self.proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self.channel = AsyncChannel(
            self.loop, ours, self._on_message, self._on_close, with_fds=True
        )
        try:
            await asyncio.wait_for(self._hello, timeout)
        except TimeoutError:
            self.kill()
            raise RuntimeError(f"root zygote did not start within {timeout:.0f}s") from None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return (
            self.proc is not None
            and self.proc.poll() is None
            and self.channel is not None
            and not self.channel.closed
        )

    def spawn(
        self, fid: str, spec: dict[str, Any], events: WorkerEvents, tag: str
    ) -> SnapshotHandle:
        """Ask for a snapshot; await ``handle.ready`` for its ``ready`` message."""
        if self.channel is None or self.channel.closed:
            raise RuntimeError("root zygote is not running")
        handle = SnapshotHandle(fid, events, self.loop.create_future())
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        handle.channel = AsyncChannel(
            self.loop, ours, handle._on_message, handle._on_close, with_fds=True
        )
        handle.output = OutputReader(self.loop, out_r, tag, self.output_sink)
        self._by_fid[fid] = handle
        self.channel.send({"t": "spawn", "fid": fid, "spec": spec}, fds=[theirs.fileno(), out_w])
        theirs.close()
        os.close(out_w)
        return handle

    def _on_message(self, msg: Message, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        kind = msg["t"]
        if kind == "hello":
            if not self._hello.done():
                self._hello.set_result(msg["pid"])
        elif kind == "spawned":
            handle = self._by_fid.get(msg["fid"])
            if handle is not None:
                handle.pid = msg["pid"]
                self._by_pid[msg["pid"]] = handle
        elif kind == "exited":
            handle = self._by_pid.pop(msg["pid"], None)
            if handle is not None:
                self._by_fid.pop(handle.fid, None)
                status = ExitStatus(msg["code"], msg["signal"])
                handle.info["exit"] = status.describe()

    def _on_close(self, reason: str) -> None:
        if not self._hello.done():
            self._hello.set_exception(RuntimeError(f"root zygote failed to start ({reason})"))
        elif self.on_lost is not None:
            self.on_lost(reason)

    def forget(self, fid: str) -> None:
        handle = self._by_fid.pop(fid, None)
        if handle is not None and handle.pid is not None:
            self._by_pid.pop(handle.pid, None)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop every snapshot (they take their workers with them), then the root zygote."""
        for handle in list(self._by_fid.values()):
            handle.kill()
        if self.channel is not None:
            self.channel.close("daemon stopping")
        if self.proc is None:
            return
        deadline = self.loop.time() + timeout
        while self.proc.poll() is None and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        self.kill()
        try:
            self.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
            pass


def pid_of(pidfd: int) -> int:
    """The pid, in our own pid namespace, of the process a pidfd refers to (0: it has exited).

    A snapshot lives in a pid namespace of its own; the pids it knows are not ours. The
    kernel translates in the pidfd's fdinfo, for the namespace of the /proc we read it in.
    """
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return max(int(line.split()[1]), 0)
    raise OSError(f"fd {pidfd} is not a pidfd")


def kill_pid(pid: int) -> None:
    if pid <= 0:  # never a process group, never "everything we may signal"
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise
