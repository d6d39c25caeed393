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
from hourai.protocol import (
    SNAPSHOT_FRAME_MAX,
    Message,
    Violation,
    check_snapshot_message,
)
from hourai.units import format_size

log = logging.getLogger("hourai.snapshot")


# What one function may print, over all its processes: a burst, then a steady rate. Beyond
# it lines are dropped, counted and said (at most one notice a second), so a function that
# prints 50 MB costs the daemon a read and a newline count per 64 KiB, not a write per line.
OUTPUT_LINE_RATE = 1000.0  # lines per second
OUTPUT_LINE_BURST = 10_000
OUTPUT_BYTE_RATE = 1 << 20  # bytes per second
OUTPUT_BYTE_BURST = 8 << 20
MAX_LINE = 16 * 1024  # a longer line keeps its head and says how much was cut
NOTICE_INTERVAL = 1.0
_READ = 65536


def function_of(tag: str) -> str:
    """The function an output tag belongs to: ``hello#1234`` and ``hello/snapshot`` → hello."""
    return tag.split("#", 1)[0].split("/", 1)[0]


class OutputBudget:
    """Token buckets (lines and bytes) for one function's output, and what was dropped."""

    __slots__ = (
        "byte_burst",
        "byte_rate",
        "bytes",
        "dropped_bytes",
        "dropped_lines",
        "line_burst",
        "line_rate",
        "lines",
        "notice_due",
        "stamp",
        "timer",
    )

    def __init__(
        self,
        line_rate: float = OUTPUT_LINE_RATE,
        line_burst: int = OUTPUT_LINE_BURST,
        byte_rate: float = OUTPUT_BYTE_RATE,
        byte_burst: int = OUTPUT_BYTE_BURST,
    ) -> None:
        self.line_rate, self.line_burst = line_rate, line_burst
        self.byte_rate, self.byte_burst = byte_rate, byte_burst
        self.lines = float(line_burst)
        self.bytes = float(byte_burst)
        self.stamp: float | None = None
        self.dropped_lines = 0
        self.dropped_bytes = 0
        self.notice_due = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def refill(self, now: float) -> None:
        if self.stamp is not None and now > self.stamp:
            elapsed = now - self.stamp
            self.lines = min(self.line_burst, self.lines + elapsed * self.line_rate)
            self.bytes = min(self.byte_burst, self.bytes + elapsed * self.byte_rate)
        self.stamp = now

    def empty(self) -> bool:
        return self.lines < 1 or self.bytes < 1

    def take(self, size: int) -> bool:
        """One line of ``size`` bytes: keep it (True) or count it dropped (False)."""
        if self.lines >= 1 and self.bytes >= size:
            self.lines -= 1
            self.bytes -= size
            return True
        self.drop(1, size)
        return False

    def drop(self, lines: int, size: int) -> None:
        self.dropped_lines += lines
        self.dropped_bytes += size

    def notice(self, function: str) -> str | None:
        """The line that says what was dropped since the last one; resets the counts."""
        if not self.dropped_lines and not self.dropped_bytes:
            return None
        text = (
            f"… {self.dropped_lines} lines ({format_size(self.dropped_bytes, exact=False)}) "
            f"dropped: {function} printed more than its output limit of "
            f"{self.line_rate:g} lines/s and {format_size(int(self.byte_rate))}/s "
            f"(bursts of {self.line_burst} lines, {format_size(self.byte_burst)})"
        )
        self.dropped_lines = self.dropped_bytes = 0
        return text


# One budget per function, shared by its snapshot's and workers' readers; the daemon is one
# process with one loop, so this is the daemon's view of each function's output.
_budgets: dict[str, OutputBudget] = {}


def output_budget(function: str) -> OutputBudget:
    budget = _budgets.get(function)
    if budget is None:
        budget = _budgets[function] = OutputBudget()
    return budget


class OutputReader:
    """Reads a child's stdout/stderr pipe and hands over whole lines, tagged, within the
    function's :class:`OutputBudget` (lines over it are counted, not handed over)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        tag: str,
        sink: Callable[[str, str], None],
        budget: OutputBudget | None = None,
    ) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.tag = tag
        self.sink = sink
        self.function = function_of(tag)
        self.budget = budget if budget is not None else output_budget(self.function)
        self._loop = loop
        self._partial = b""
        self._cut = 0  # bytes of the current line beyond MAX_LINE, thrown away
        loop.add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self.fd, _READ)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self._consume(data)

    def _consume(self, data: bytes) -> None:
        budget = self.budget
        budget.refill(self._loop.time())
        last = data.rfind(b"\n")
        if last < 0:
            self._extend_partial(data)
            return
        if budget.empty():
            # Over budget: count what ends in this chunk without splitting it.
            lines = data.count(b"\n", 0, last + 1)
            budget.drop(lines, last + 1 + len(self._partial) + self._cut - lines)
            self._partial, self._cut = b"", 0
            self._dropped()
            self._extend_partial(data[last + 1 :])
            return
        lines = data[:last].split(b"\n")
        lines[0] = self._partial + lines[0]
        first_cut, self._partial, self._cut = self._cut, b"", 0
        for i, line in enumerate(lines):
            cut = first_cut if i == 0 else 0
            if len(line) > MAX_LINE:
                cut += len(line) - MAX_LINE
                line = line[:MAX_LINE]
            if not budget.take(len(line)):
                rest = lines[i + 1 :]
                budget.drop(len(rest), sum(map(len, rest)))
                self._dropped()
                break
            self._emit(line, cut)
        self._extend_partial(data[last + 1 :])

    def _extend_partial(self, data: bytes) -> None:
        room = MAX_LINE - len(self._partial)
        if len(data) > room:
            self._cut += len(data) - max(room, 0)
            data = data[: max(room, 0)]
        if data:
            self._partial += data

    def _emit(self, line: bytes, cut: int) -> None:
        text = line.decode("utf-8", "replace")
        if cut:
            text += f" … ({format_size(cut, exact=False)} more of this line cut)"
        self.sink(self.tag, text)

    def _dropped(self) -> None:
        budget = self.budget
        if budget.timer is None:
            delay = max(0.0, budget.notice_due - self._loop.time())
            budget.timer = self._loop.call_later(delay, self._notice)

    def _notice(self) -> None:
        budget = self.budget
        budget.timer = None
        budget.notice_due = self._loop.time() + NOTICE_INTERVAL
        text = budget.notice(self.function)
        if text is not None:
            self.sink(self.tag, text)

    def close(self) -> None:
        if self.fd < 0:
            return
        if self._partial or self._cut:
            self.budget.refill(self._loop.time())
            if self.budget.take(len(self._partial)):
                self._emit(self._partial, self._cut)
            self._partial, self._cut = b"", 0
        if self.budget.timer is not None and self.budget.dropped_lines:
            # The last words of a flooding process: say what was dropped now, not later.
            self.budget.timer.cancel()
            self._notice()
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
    # What forked it: the root zygote, or a package zygote (hourai.snapshot.tree)
    parent: Any = None

    def fork(self, wid: int, *, spare: bool = False) -> None:
        """``spare``: the worker waits for a request, and may prime itself meanwhile."""
        if self.channel is None or self.channel.closed:
            self.events.fork_failed(wid, "snapshot is gone")
            return
        self.channel.send({"t": "fork", "wid": wid, "spare": spare})

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

    # -- messages from the snapshot process (which runs tenant code: checked, never trusted)
    def _on_message(self, msg: Message, fds: list[int]) -> None:
        try:
            check_snapshot_message(msg, len(fds))
        except Violation:
            for fd in fds:
                os.close(fd)
            raise  # the channel closes on it; _on_close kills the snapshot
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
        error = self.channel.error if self.channel is not None else None
        if error is not None:
            log.warning("snapshot %s broke the channel protocol (%s): killed", self.fid, error)
            self.kill()
            self.stopping = False  # lost, not stopped: it is rebuilt on demand
            reason = f"it broke the channel protocol: {error}"
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
        handle = SnapshotHandle(fid, events, self.loop.create_future(), parent=self)
        self.launch(handle, spec, tag)
        return handle

    def launch(self, child: Any, spec: dict[str, Any], tag: str) -> None:
        """Fork ``child`` (a SnapshotHandle, or a package zygote's node) with ``spec``."""
        if self.channel is None or self.channel.closed:
            raise RuntimeError("root zygote is not running")
        self._by_fid[child.fid] = child
        launch(self.loop, self.channel, child, spec, tag, self.output_sink)

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


def launch(
    loop: asyncio.AbstractEventLoop,
    parent: AsyncChannel,
    child: Any,
    spec: dict[str, Any],
    tag: str,
    sink: Callable[[str, str], None],
) -> None:
    """Ask the zygote at the end of ``parent`` to fork ``child``: its channel and output
    pipe are made here and their far ends passed along with the ``spawn`` command."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    out_r, out_w = os.pipe()
    child.channel = AsyncChannel(
        loop, ours, child._on_message, child._on_close, with_fds=True, max_frame=SNAPSHOT_FRAME_MAX
    )
    child.output = OutputReader(loop, out_r, tag, sink)
    try:
        parent.send({"t": "spawn", "fid": child.fid, "spec": spec}, fds=[theirs.fileno(), out_w])
    finally:
        theirs.close()
        os.close(out_w)


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
