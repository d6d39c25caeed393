"""The durable store of asynchronous invocations: one SQLite database in the state dir.

Every invocation is one row, and its life is a small state machine, each transition one
committed transaction (WAL journal, ``synchronous=FULL``: a commit has reached the disk
when it returns, so an event is durable before its 202 is sent)::

    accept ──> queued ──claim──> running ──succeed──> succeeded ──purge──> (gone)
                 ^                  │
                 │  fail (attempts  │ fail (retries spent) / expire (too old)
                 └── left) / throttle / interrupted (daemon died) ──> dead ──purge──> (gone)

- ``claim`` hands out only ``queued`` rows whose ``not_before`` has come, and bumps
  ``attempt``: a finish names the attempt it reports on, and one for any other attempt (a
  stale result after a timeout, a restart) changes nothing. So a row that succeeded is never
  handed out again, and a row is never lost: it is always in exactly one of the states.
- A row found ``running`` when the store is opened was running when the daemon died. It is
  queued again; that interruption is not counted as a retry (the function did not fail), but
  it is counted, and an event that was running at ``MAX_INTERRUPTIONS`` deaths of the daemon
  goes to the dead letters: it may be what kills it.
- ``dead`` rows are the dead-letter store: kept, with their event and last error, for
  ``dead_retention``; ``succeeded`` rows keep their result for ``retention``.
- ``traceparent`` is the trace context that accepted the event (with tracing on: the
  accepting request's ``publish`` span), kept so that every attempt's trace links to it.

The schema only grows: a column added since a store was made is added when it is opened
(:data:`ADDED_COLUMNS`), so the store an older hourai wrote keeps its events.

The object is synchronous and takes ``now`` from its caller (wall-clock seconds, since rows
outlive the process): the property tests drive it directly. The daemon calls it from one
thread of its own (:class:`hourai.invocations.runner.AsyncStore`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
DEAD = "dead"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, DEAD)

MAX_INTERRUPTIONS = 5
# Kept at most per row: an invocation's result or error (Lambda's async payload is 256 KB).
MAX_RESULT_BYTES = 256 * 1024

SCHEMA = """
CREATE TABLE IF NOT EXISTS invocations (
    id TEXT PRIMARY KEY,
    function TEXT NOT NULL,
    event BLOB NOT NULL,
    source TEXT NOT NULL,
    status TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,      -- attempts started (retries = attempt - 1)
    max_attempts INTEGER NOT NULL,
    interrupted INTEGER NOT NULL DEFAULT 0,  -- attempts cut by a daemon death
    accepted_at REAL NOT NULL,
    expires_at REAL NOT NULL,                -- maximum event age
    not_before REAL NOT NULL,                -- retry backoff
    started_at REAL,
    finished_at REAL,
    status_code INTEGER,
    result BLOB,
    error TEXT,
    condition TEXT,                          -- Success, RetriesExhausted, EventAgeExceeded
    traceparent TEXT                         -- W3C trace context of what accepted it
);
CREATE INDEX IF NOT EXISTS due ON invocations (status, function, not_before);
CREATE INDEX IF NOT EXISTS by_function ON invocations (function, accepted_at);
CREATE TABLE IF NOT EXISTS schedules (
    function TEXT PRIMARY KEY,
    expression TEXT NOT NULL,
    last_tick REAL NOT NULL,
    missed INTEGER NOT NULL DEFAULT 0,
    missed_note TEXT
);
"""


# Columns of ``invocations`` that the first schema lacked, in the order they came: opening a
# store made before one of them adds it (NULL in the rows already there).
ADDED_COLUMNS: tuple[tuple[str, str], ...] = (("traceparent", "TEXT"),)


class QueueError(Exception):
    """The store cannot be used (unreadable, full disk); the message says which file."""


@dataclass(frozen=True)
class Invocation:
    id: str
    function: str
    event: bytes
    source: str
    status: str
    attempt: int
    max_attempts: int
    interrupted: int
    accepted_at: float
    expires_at: float
    not_before: float
    started_at: float | None
    finished_at: float | None
    status_code: int | None
    result: bytes | None
    error: str | None
    condition: str | None
    traceparent: str | None = None

    def describe(self, *, with_event: bool = False) -> dict[str, Any]:
        """What ``hourai invocations`` shows (JSON-able)."""
        doc: dict[str, Any] = {
            "id": self.id,
            "function": self.function,
            "source": self.source,
            "status": self.status,
            "attempts": self.attempt,
            "max_attempts": self.max_attempts,
            "accepted_at": self.accepted_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "status_code": self.status_code,
            "error": self.error,
            "condition": self.condition,
        }
        if self.interrupted:
            doc["interrupted"] = self.interrupted
        if self.traceparent:
            doc["traceparent"] = self.traceparent
        if self.result is not None:
            doc["result"] = _text(self.result)
        if with_event:
            doc["event"] = _text(self.event)
        return doc


def _text(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace")


@dataclass(frozen=True)
class Accept:
    """An event to store: for whom, and the retry budget it gets."""

    function: str
    event: bytes
    source: str = "api"
    max_attempts: int = 3
    max_age: float = 21600.0
    delay: float = 0.0
    traceparent: str | None = None  # the trace context that accepted it


_COLUMNS = ", ".join(Invocation.__dataclass_fields__)


class InvocationQueue:
    """The SQLite store and its state machine (see the module's doc)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._batched = False
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: transactions are ours (BEGIN IMMEDIATE ... COMMIT).
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA busy_timeout=5000")
            self.db.executescript(SCHEMA)
            self._migrate()
        except sqlite3.Error as exc:
            raise QueueError(f"cannot open the invocation queue {path}: {exc}") from None
        # Events may carry what the functions' callers consider private.
        for suffix in ("", "-wal", "-shm"):
            p = Path(f"{path}{suffix}")
            if p.exists():
                os.chmod(p, 0o600)

    def _migrate(self) -> None:
        """Add the columns a store made by an older hourai lacks (see ADDED_COLUMNS)."""
        have = {row[1] for row in self.db.execute("PRAGMA table_info(invocations)")}
        missing = [(name, kind) for name, kind in ADDED_COLUMNS if name not in have]
        if not missing:
            return
        # One transaction: a crash halfway leaves the old schema, and the next open retries.
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for name, kind in missing:
                self.db.execute(f"ALTER TABLE invocations ADD COLUMN {name} {kind}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything inside is one transaction, one commit (group commit): the transitions
        in it keep their own checks, they only share the fsync."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise QueueError(f"invocation queue {self.path}: {exc}") from None
        self._batched = True
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException as exc:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise QueueError(f"invocation queue {self.path}: {exc}") from None
            raise
        finally:
            self._batched = False

    def _tx(self, statements: Iterable[tuple[str, tuple[Any, ...]]]) -> int:
        cur = self.db.cursor()
        changed = 0
        try:
            if not self._batched:
                cur.execute("BEGIN IMMEDIATE")
            for sql, args in statements:
                cur.execute(sql, args)
                changed += max(cur.rowcount, 0)
            if not self._batched:
                cur.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.db.in_transaction and not self._batched:
                self.db.execute("ROLLBACK")
            raise QueueError(f"invocation queue {self.path}: {exc}") from None
        return changed

    # ------------------------------------------------------------------ transitions

    def accept(
        self,
        function: str,
        event: bytes,
        now: float,
        *,
        max_attempts: int = 3,
        max_age: float = 21600.0,
        source: str = "api",
        delay: float = 0.0,
        traceparent: str | None = None,
    ) -> str:
        """Store a new event; returns its id once it is durable."""
        item = Accept(function, event, source, max_attempts, max_age, delay, traceparent)
        return self.accept_many([item], now)[0]

    def accept_many(self, items: list[Accept], now: float) -> list[str]:
        """Several events in one transaction (one fsync): the daemon's group commit."""
        ids = [uuid.uuid4().hex for _ in items]
        self._tx(
            (
                "INSERT INTO invocations (id, function, event, source, status, max_attempts,"
                " accepted_at, expires_at, not_before, traceparent)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    iid,
                    a.function,
                    a.event,
                    a.source,
                    QUEUED,
                    a.max_attempts,
                    now,
                    now + a.max_age,
                    now + a.delay,
                    a.traceparent,
                ),
            )
            for iid, a in zip(ids, items, strict=True)
        )
        return ids

    def claim(self, function: str, now: float, limit: int) -> list[Invocation]:
        """Up to ``limit`` due events of ``function``, oldest first, now ``running``.
        Events past their maximum age are dead-lettered instead (EventAgeExceeded)."""
        if limit <= 0:
            return []
        self.expire(function, now)
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM invocations WHERE status = ? AND function = ? "
            "AND not_before <= ? ORDER BY not_before, accepted_at LIMIT ?",
            (QUEUED, function, now, limit),
        ).fetchall()
        if not rows:
            return []
        self._tx(
            (
                "UPDATE invocations SET status = ?, attempt = attempt + 1, started_at = ? "
                "WHERE id = ? AND status = ?",
                (RUNNING, now, row[0], QUEUED),
            )
            for row in rows
        )
        return [self.get(row[0]) for row in rows]  # type: ignore[misc]

    def expire(self, function: str | None, now: float) -> list[Invocation]:
        """Queued events past their maximum age become dead letters (EventAgeExceeded);
        returns them (for their on-failure destinations)."""
        where = "status = ? AND expires_at <= ?" + (" AND function = ?" if function else "")
        args: tuple[Any, ...] = (QUEUED, now) + ((function,) if function else ())
        ids = [r[0] for r in self.db.execute(f"SELECT id FROM invocations WHERE {where}", args)]
        if not ids:
            return []
        self._tx(
            (
                "UPDATE invocations SET status = ?, condition = 'EventAgeExceeded', "
                "finished_at = ?, error = coalesce(error || '; ', '') || "
                "'the event exceeded its maximum age' WHERE id = ? AND status = ?",
                (DEAD, now, iid, QUEUED),
            )
            for iid in ids
        )
        return [inv for inv in map(self.get, ids) if inv is not None]

    def succeed(self, iid: str, attempt: int, now: float, status_code: int, result: bytes) -> bool:
        """The attempt succeeded; False (and nothing changed) if it is not the running one."""
        return (
            self._tx(
                [
                    (
                        "UPDATE invocations SET status = ?, finished_at = ?, status_code = ?, "
                        "result = ?, error = NULL, condition = 'Success' "
                        "WHERE id = ? AND status = ? AND attempt = ?",
                        (
                            SUCCEEDED,
                            now,
                            status_code,
                            result[:MAX_RESULT_BYTES],
                            iid,
                            RUNNING,
                            attempt,
                        ),
                    )
                ]
            )
            == 1
        )

    def fail(
        self,
        iid: str,
        attempt: int,
        now: float,
        error: str,
        *,
        status_code: int | None = None,
        result: bytes | None = None,
        retry_delay: float = 60.0,
    ) -> str | None:
        """The attempt failed: queued again after ``retry_delay`` if attempts and age are
        left, else dead-lettered. Returns the new status (None: not the running attempt)."""
        row = self.get(iid)
        if row is None or row.status != RUNNING or row.attempt != attempt:
            return None
        retry_at = now + retry_delay
        if row.attempt < row.max_attempts and retry_at < row.expires_at:
            status, condition, finished = QUEUED, None, None
        else:
            status, finished = DEAD, now
            condition = (
                "RetriesExhausted" if row.attempt >= row.max_attempts else ("EventAgeExceeded")
            )
        self._tx(
            [
                (
                    "UPDATE invocations SET status = ?, not_before = ?, finished_at = ?, "
                    "status_code = ?, result = ?, error = ?, condition = ? "
                    "WHERE id = ? AND status = ? AND attempt = ?",
                    (
                        status,
                        retry_at,
                        finished,
                        status_code,
                        None if result is None else result[:MAX_RESULT_BYTES],
                        error[:MAX_RESULT_BYTES],
                        condition,
                        iid,
                        RUNNING,
                        attempt,
                    ),
                )
            ]
        )
        return status

    def release(self, iid: str, attempt: int, now: float, delay: float, why: str) -> bool:
        """Give a running attempt back without counting it (throttled: the function had no
        room; or the daemon is stopping): queued again after ``delay``."""
        return (
            self._tx(
                [
                    (
                        "UPDATE invocations SET status = ?, attempt = attempt - 1, "
                        "not_before = ?, error = ? WHERE id = ? AND status = ? AND attempt = ?",
                        (QUEUED, now + delay, why, iid, RUNNING, attempt),
                    )
                ]
            )
            == 1
        )

    def recover(self, now: float) -> int:
        """At open: what was running when the daemon died is queued again (see the
        module's doc); returns how many."""
        dead = self._tx(
            [
                (
                    "UPDATE invocations SET status = ?, finished_at = ?, "
                    "condition = 'RetriesExhausted', interrupted = interrupted + 1, "
                    "error = 'running when the daemon died, ' || (interrupted + 1) || "
                    "' times: set aside (it may be what kills it)' "
                    "WHERE status = ? AND interrupted + 1 >= ?",
                    (DEAD, now, RUNNING, MAX_INTERRUPTIONS),
                ),
                (
                    "UPDATE invocations SET status = ?, attempt = attempt - 1, "
                    "interrupted = interrupted + 1, not_before = ?, "
                    "error = 'interrupted: the daemon stopped while it ran' WHERE status = ?",
                    (QUEUED, now, RUNNING),
                ),
            ]
        )
        return dead

    def dead_letter(self, function: str, now: float, why: str) -> int:
        """Every queued event of ``function`` to the dead letters (it was removed)."""
        return self._tx(
            [
                (
                    "UPDATE invocations SET status = ?, finished_at = ?, error = ?, "
                    "condition = 'RetriesExhausted' WHERE function = ? AND status = ?",
                    (DEAD, now, why, function, QUEUED),
                )
            ]
        )

    def purge(self, now: float, retention: float, dead_retention: float) -> int:
        """Forget results older than ``retention`` and dead letters older than
        ``dead_retention``."""
        return self._tx(
            [
                (
                    "DELETE FROM invocations WHERE (status = ? AND finished_at <= ?) "
                    "OR (status = ? AND finished_at <= ?)",
                    (SUCCEEDED, now - retention, DEAD, now - dead_retention),
                )
            ]
        )

    # ------------------------------------------------------------------ reads

    def get(self, iid: str) -> Invocation | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM invocations WHERE id = ?", (iid,)).fetchone()
        return Invocation(*row) if row else None

    def list(self, function: str, limit: int = 50, status: str | None = None) -> list[Invocation]:
        sql = f"SELECT {_COLUMNS} FROM invocations WHERE function = ?"
        args: list[Any] = [function]
        if status is not None:
            sql += " AND status = ?"
            args.append(status)
        sql += " ORDER BY accepted_at DESC LIMIT ?"
        args.append(limit)
        return [Invocation(*row) for row in self.db.execute(sql, args).fetchall()]

    def depth(self) -> dict[str, dict[str, Any]]:
        """Per function: events by status and the accept time of the oldest queued one."""
        out: dict[str, dict[str, Any]] = {}
        for fn, status, n, oldest in self.db.execute(
            "SELECT function, status, count(*), min(accepted_at) FROM invocations "
            "GROUP BY function, status"
        ):
            entry = out.setdefault(fn, {s: 0 for s in STATUSES} | {"oldest": None})
            entry[status] = n
            if status == QUEUED:
                entry["oldest"] = oldest
        return out

    def next_due(self, functions: Iterable[str]) -> float | None:
        """The earliest ``not_before`` of a queued event of one of ``functions``."""
        names = list(functions)
        if not names:
            return None
        marks = ",".join("?" * len(names))
        row = self.db.execute(
            f"SELECT min(not_before) FROM invocations WHERE status = ? AND function IN ({marks})",
            (QUEUED, *names),
        ).fetchone()
        return row[0] if row else None

    # ------------------------------------------------------------------ schedules

    def schedule_state(self, function: str) -> tuple[str, float, int, str | None] | None:
        row = self.db.execute(
            "SELECT expression, last_tick, missed, missed_note FROM schedules WHERE function = ?",
            (function,),
        ).fetchone()
        return tuple(row) if row else None  # type: ignore[return-value]

    def set_schedule(
        self,
        function: str,
        expression: str,
        last_tick: float,
        missed: int | None = None,
        note: str | None = None,
    ) -> None:
        self._tx(
            [
                (
                    "INSERT INTO schedules (function, expression, last_tick, missed, missed_note)"
                    " VALUES (?, ?, ?, coalesce(?, 0), ?) ON CONFLICT(function) DO UPDATE SET "
                    "expression = excluded.expression, last_tick = excluded.last_tick, "
                    "missed = coalesce(?, missed), missed_note = coalesce(?, missed_note)",
                    (function, expression, last_tick, missed, note, missed, note),
                )
            ]
        )

    def drop_schedule(self, function: str) -> None:
        self._tx([("DELETE FROM schedules WHERE function = ?", (function,))])
