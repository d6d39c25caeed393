"""Logs: the daemon's own (text or JSON lines) and one file per function, rotated by size.

A function's stdout and stderr, line by line and tagged with the process
(``[hello#1234]`` for a worker, ``[hello/snapshot]`` for its snapshot), go to
``<state>/logs/<function>.log`` (and only there: the daemon's own log and journald get none
of it), held to the function's output budget (see :class:`hourai.snapshot.manager.
OutputBudget`; what is dropped is counted in a line of its own). Beside it, tagged
``[hourai]``, is what the daemon has to say about the function: deploys, refusals with their
traceback, workers killed for breaking the channel protocol or timing out, deaths with
their cause (signal, exit status, OOM kill), crash-loop backoff and recovery.

At ``max_bytes`` the file becomes ``.log.1`` (``.log.1`` becomes ``.log.2`` and so on) and
``files`` rotated files are kept. ``hourai logs`` reads them through the control API with a
cursor that survives rotation: the inode of the file and an offset in it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Any, TextIO

from hourai.daemon import Observer
from hourai.scheduler.core import FunctionState

# Open files kept per daemon: functions that print stay open, the rest are reopened.
MAX_OPEN = 128
READ_LIMIT = 1 << 20  # bytes one read of the logs returns at most


# ---------------------------------------------------------------------- the daemon's log


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (RFC 3339, UTC), level, logger, msg, and exc if any;
    a function's line also request_id (and trace_id when traced)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        # A function's line names the invocation that printed it (see Runtime._function_output).
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            doc["request_id"] = request_id
            error_id = getattr(record, "error_id", None)
            if error_id is not None:
                doc["error_id"] = error_id
            trace_id = getattr(record, "trace_id", None)
            if trace_id is not None:
                doc["trace_id"] = trace_id
        if record.exc_info:
            doc["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(doc, ensure_ascii=False)


class JournalFormatter(logging.Formatter):
    """Text with the syslog priority prefix journald understands (``<3>`` for errors), and
    no timestamp: the journal adds its own."""

    PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{self.PRIORITY.get(record.levelname, 6)}>"
        return "\n".join(prefix + line for line in text.splitlines())


def stderr_is_journal(stream: TextIO = sys.stderr) -> bool:
    """Whether ``stream`` is connected to journald ($JOURNAL_STREAM names its device:inode)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def setup_daemon_logging(
    level: int, fmt: str = "text", *, access: bool = True, stream: TextIO | None = None
) -> None:
    """(Re)configure the root logger; safe to call again on a reload."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif stderr_is_journal(stream):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # One line per request is the busiest logger by far; it can be turned off alone.
    logging.getLogger("hourai.access").setLevel(logging.NOTSET if access else logging.WARNING)


# ---------------------------------------------------------------------- per-function files


def _stamp(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


class _File:
    __slots__ = ("fd", "inode", "size")

    def __init__(self, fd: int, inode: int, size: int) -> None:
        self.fd = fd
        self.inode = inode
        self.size = size


class FunctionLogs(Observer):
    """Writes each function's output to its file; reads them back for ``hourai logs``."""

    keeps_function_output = True

    def __init__(self, root: Path, max_bytes: int = 10 << 20, files: int = 5) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)  # output may hold anything a function printed
        self.max_bytes = max_bytes
        self.files = files
        self._open: OrderedDict[str, _File] = OrderedDict()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._failed: set[str] = set()

    # -- writing (on the event loop; one write(2) per line, appended)

    def path(self, function: str) -> Path:
        return self.root / f"{function}.log"

    def function_output(self, function: str, tag: str, line: str) -> None:
        self.write(function, f"{_stamp(time.time())} [{tag}] {line}\n")

    def function_verdict(self, function: str, message: str) -> None:
        self.event(function, message)

    def function_state(self, state: FunctionState) -> None:
        # Deploys, refusals and switches are told by the service in its own words; the
        # scheduler's verdicts (backoff, recovery) only here.
        if state.state in ("removed", "failed") or state.detail.startswith("version "):
            return
        self.event(
            state.function, f"{state.state}: {state.detail}" if state.detail else state.state
        )

    def event(self, function: str, message: str) -> None:
        """What the daemon has to say about a function, in the function's own log."""
        stamp = _stamp(time.time())
        text = "".join(f"{stamp} [hourai] {line}\n" for line in message.rstrip().splitlines())
        self.write(function, text)

    def write(self, function: str, text: str) -> None:
        data = text.encode("utf-8", "replace")
        try:
            f = self._file(function)
            if f.size and f.size + len(data) > self.max_bytes:
                self._rotate(function)
                f = self._file(function)
            os.write(f.fd, data)
            f.size += len(data)
        except OSError as exc:
            # A full disk must not take the daemon down; say it once per function.
            if function not in self._failed:
                self._failed.add(function)
                logging.getLogger("hourai").error(
                    "cannot write the log of %s: %s", function, exc.strerror
                )
            return
        self._failed.discard(function)
        waiters = self._waiters.pop(function, None)
        for fut in waiters or ():
            if not fut.done():
                fut.set_result(None)

    def _file(self, function: str) -> _File:
        f = self._open.get(function)
        if f is not None:
            self._open.move_to_end(function)
            return f
        fd = os.open(
            self.path(function), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        st = os.fstat(fd)
        f = self._open[function] = _File(fd, st.st_ino, st.st_size)
        while len(self._open) > MAX_OPEN:
            _, old = self._open.popitem(last=False)
            os.close(old.fd)
        return f

    def _close(self, function: str) -> None:
        f = self._open.pop(function, None)
        if f is not None:
            os.close(f.fd)

    def _rotate(self, function: str) -> None:
        self._close(function)
        base = self.path(function)
        for i in range(self.files - 1, 0, -1):
            src = base.with_name(f"{base.name}.{i}")
            if src.exists():
                os.replace(src, base.with_name(f"{base.name}.{i + 1}"))
        os.replace(base, base.with_name(f"{base.name}.1"))
        for extra in self._rotated(function)[self.files :]:
            extra.unlink(missing_ok=True)

    def _rotated(self, function: str) -> list[Path]:
        """Rotated files, newest first."""
        base = self.path(function)
        found = []
        for p in self.root.glob(f"{base.name}.*"):
            suffix = p.name[len(base.name) + 1 :]
            if suffix.isdigit():
                found.append((int(suffix), p))
        return [p for _, p in sorted(found)]

    def remove(self, function: str) -> None:
        self._close(function)
        for p in [self.path(function), *self._rotated(function)]:
            p.unlink(missing_ok=True)
        for fut in self._waiters.pop(function, []):
            if not fut.done():
                fut.set_result(None)

    def close(self) -> None:
        for name in list(self._open):
            self._close(name)

    def set_rotation(self, max_bytes: int, files: int) -> None:
        self.max_bytes = max_bytes
        self.files = files

    # -- reading

    def exists(self, function: str) -> bool:
        return self.path(function).exists() or bool(self._rotated(function))

    def _chain(self, function: str) -> list[tuple[Path, int]]:
        """Every file of the function, oldest first, with its inode."""
        out = []
        for p in [*reversed(self._rotated(function)[: self.files]), self.path(function)]:
            try:
                out.append((p, p.stat().st_ino))
            except FileNotFoundError:
                continue
        return out

    def tail(self, function: str, lines: int) -> tuple[str, str]:
        """The last ``lines`` lines (over rotated files too), and the cursor after them."""
        chain = self._chain(function)
        if not chain:
            return "", "0:0"
        chunks: list[bytes] = []
        count = 0
        for path, _ino in reversed(chain):
            _, data = _read(path, 0, None)
            chunks.insert(0, data)
            count += data.count(b"\n")
            if count > lines:
                break
        text = b"".join(chunks)
        if lines <= 0:
            text = b""
        else:
            parts = text.splitlines(keepends=True)
            text = b"".join(parts[-lines:])
        last, ino = chain[-1]
        return text.decode("utf-8", "replace"), f"{ino}:{last.stat().st_size}"

    def read(self, function: str, cursor: str, limit: int = READ_LIMIT) -> tuple[str, str]:
        """What was written after ``cursor`` (at most ``limit`` bytes), and the next cursor.

        The cursor names a file by inode, so it stays valid when that file is rotated; a
        cursor whose file was rotated away entirely restarts at the oldest file kept.
        """
        try:
            ino_text, _, off_text = cursor.partition(":")
            ino, offset = int(ino_text), int(off_text)
        except ValueError:
            raise ValueError(f"bad cursor {cursor!r}: expected INODE:OFFSET") from None
        chain = self._chain(function)
        if not chain:
            return "", "0:0"
        index = next((i for i, (_, i_ino) in enumerate(chain) if i_ino == ino), None)
        if index is None:
            index, offset = 0, 0
        out: list[bytes] = []
        budget = limit
        while True:
            path, file_ino = chain[index]
            offset, data = _read(path, offset, budget)
            if len(data) == budget:
                # Stop at a line boundary when one is in reach, so no line is split.
                cut = data.rfind(b"\n") + 1
                data = data[:cut] if cut else data
            out.append(data)
            offset += len(data)
            budget -= len(data)
            if budget <= 0 or index == len(chain) - 1:
                break
            try:
                at_end = offset >= path.stat().st_size
            except FileNotFoundError:
                at_end = True
            if not at_end:
                break
            index, offset = index + 1, 0
        return b"".join(out).decode("utf-8", "replace"), f"{file_ino}:{offset}"

    def watch(self, function: str) -> asyncio.Future[None]:
        """A future done at the next write to the function's log. Taken before a read, it
        catches a line written while the read ran, which a wait begun after would miss."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(function, []).append(fut)
        return fut

    def unwatch(self, function: str, fut: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(function)
        if waiters and fut in waiters:
            waiters.remove(fut)
            if not waiters:
                del self._waiters[function]

    async def wait(
        self, function: str, timeout: float, watched: asyncio.Future[None] | None = None
    ) -> None:
        """Until something is written to the function's log (since ``watched`` was taken,
        if given), or ``timeout`` seconds."""
        fut = watched if watched is not None else self.watch(function)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            self.unwatch(function, fut)


def _read(path: Path, offset: int, limit: int | None) -> tuple[int, bytes]:
    """(where the read started, the bytes): from ``offset``, or from 0 if the file is now
    shorter than that (it was replaced)."""
    try:
        with open(path, "rb") as f:
            if offset > os.fstat(f.fileno()).st_size:
                offset = 0
            f.seek(offset)
            return offset, f.read() if limit is None else f.read(limit)
    except FileNotFoundError:
        return 0, b""
