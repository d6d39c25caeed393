"""The durable queue's state machine, driven directly: examples, then any interleaving."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hourai.invocations.queue import (
    DEAD,
    MAX_INTERRUPTIONS,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Accept,
    InvocationQueue,
)


def test_accept_claim_succeed(tmp_path: Path) -> None:
    q = InvocationQueue(tmp_path / "q.db")
    iid = q.accept("f", b'{"a": 1}', 100.0)
    assert q.get(iid).status == QUEUED  # type: ignore[union-attr]
    (inv,) = q.claim("f", 100.0, 10)
    assert inv.status == RUNNING and inv.attempt == 1
    assert q.claim("f", 100.0, 10) == []
    assert q.succeed(iid, 1, 101.0, 200, b'"ok"')
    assert not q.succeed(iid, 1, 101.0, 200, b'"ok"')  # once
    got = q.get(iid)
    assert got is not None and got.status == SUCCEEDED and got.describe()["result"] == "ok"
    assert q.purge(101.0 + 10, retention=5, dead_retention=100) == 1
    assert q.get(iid) is None


def test_retries_then_dead_letter(tmp_path: Path) -> None:
    q = InvocationQueue(tmp_path / "q.db")
    iid = q.accept("f", b"{}", 0.0, max_attempts=3)
    now = 0.0
    for attempt in (1, 2):
        (inv,) = q.claim("f", now, 1)
        assert inv.attempt == attempt
        assert q.fail(iid, attempt, now, "boom", retry_delay=5) == QUEUED
        assert q.claim("f", now + 4, 1) == []  # backoff
        now += 5
    (inv,) = q.claim("f", now, 1)
    assert q.fail(iid, 3, now, "boom") == DEAD
    got = q.get(iid)
    assert got is not None and got.condition == "RetriesExhausted" and got.attempt == 3


def test_max_age(tmp_path: Path) -> None:
    q = InvocationQueue(tmp_path / "q.db")
    iid = q.accept("f", b"{}", 0.0, max_age=10)
    assert q.claim("f", 11.0, 1) == []
    got = q.get(iid)
    assert got is not None and got.status == DEAD and got.condition == "EventAgeExceeded"
    # a retry that would come after the maximum age is not scheduled
    iid = q.accept("f", b"{}", 20.0, max_age=10)
    q.claim("f", 20.0, 1)
    assert q.fail(iid, 1, 21.0, "x", retry_delay=60) == DEAD


def test_durable_across_an_abrupt_close(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    q = InvocationQueue(path)
    iid = q.accept("f", b"{}", 0.0)
    q.claim("f", 0.0, 1)
    # no close(): what a kill -9 leaves is a committed WAL
    again = InvocationQueue(path)
    assert again.recover(1.0) == 1
    got = again.get(iid)
    assert got is not None and got.status == QUEUED and got.attempt == 0
    assert got.interrupted == 1
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_interrupted_too_often_is_set_aside(tmp_path: Path) -> None:
    q = InvocationQueue(tmp_path / "q.db")
    iid = q.accept("f", b"{}", 0.0)
    for _ in range(MAX_INTERRUPTIONS):
        assert q.claim("f", 0.0, 1)
        q.recover(0.0)
    got = q.get(iid)
    assert got is not None and got.status == DEAD and "daemon died" in (got.error or "")


def test_release_does_not_count(tmp_path: Path) -> None:
    q = InvocationQueue(tmp_path / "q.db")
    iid = q.accept("f", b"{}", 0.0)
    q.claim("f", 0.0, 1)
    assert q.release(iid, 1, 0.0, 2.0, "throttled")
    (inv,) = q.claim("f", 2.0, 1)
    assert inv.attempt == 1


class QueueMachine(RuleBasedStateMachine):
    """Any interleaving of accept / claim / succeed / fail / stale finishes / crash and
    restart keeps every accepted event queued, running, succeeded or dead; never lost, and
    never handed out again after it succeeded."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="hourai-q-"))
        self.q = InvocationQueue(self.dir / "q.db")
        self.now = 0.0
        self.accepted: set[str] = set()
        self.running: dict[str, int] = {}  # id -> attempt we hold
        self.succeeded: set[str] = set()
        self.stale: list[tuple[str, int]] = []

    def teardown(self) -> None:
        import shutil

        self.q.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(fn=st.sampled_from(["a", "b"]), retries=st.integers(0, 2))
    def accept(self, fn: str, retries: int) -> None:
        self.accepted.add(
            self.q.accept(fn, b"{}", self.now, max_attempts=retries + 1, max_age=50.0)
        )

    @rule(fn=st.sampled_from(["a", "b"]), n=st.integers(1, 3))
    def claim(self, fn: str, n: int) -> None:
        for inv in self.q.claim(fn, self.now, n):
            assert inv.id not in self.succeeded, "ran again after success"
            assert inv.id not in self.running
            self.running[inv.id] = inv.attempt

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def succeed(self, data: st.DataObject) -> None:
        iid = data.draw(st.sampled_from(sorted(self.running)))
        attempt = self.running.pop(iid)
        assert self.q.succeed(iid, attempt, self.now, 200, b"1")
        self.succeeded.add(iid)
        self.stale.append((iid, attempt))

    @precondition(lambda self: self.running)
    @rule(data=st.data(), delay=st.floats(0, 20))
    def fail(self, data: st.DataObject, delay: float) -> None:
        iid = data.draw(st.sampled_from(sorted(self.running)))
        attempt = self.running.pop(iid)
        assert self.q.fail(iid, attempt, self.now, "x", retry_delay=delay) in (QUEUED, DEAD)
        self.stale.append((iid, attempt))

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def throttle(self, data: st.DataObject) -> None:
        iid = data.draw(st.sampled_from(sorted(self.running)))
        attempt = self.running.pop(iid)
        assert self.q.release(iid, attempt, self.now, 1.0, "throttled")
        self.stale.append((iid, attempt))

    @precondition(lambda self: self.stale)
    @rule(data=st.data(), ok=st.booleans())
    def stale_finish(self, data: st.DataObject, ok: bool) -> None:
        iid, attempt = data.draw(st.sampled_from(self.stale))
        if iid in self.running and self.running[iid] == attempt:
            return
        before = self.q.get(iid)
        if ok:
            assert not self.q.succeed(iid, attempt, self.now, 200, b"late")
        else:
            assert self.q.fail(iid, attempt, self.now, "late") is None
        assert self.q.get(iid) == before

    @rule(dt=st.floats(0, 30))
    def time_passes(self, dt: float) -> None:
        self.now += dt

    @rule(clean=st.booleans())
    def restart(self, clean: bool) -> None:
        if clean:
            self.q.close()
        self.q = InvocationQueue(self.dir / "q.db")
        self.q.recover(self.now)
        self.stale += list(self.running.items())
        self.running.clear()

    @invariant()
    def nothing_lost(self) -> None:
        for iid in self.accepted:
            inv = self.q.get(iid)
            assert inv is not None, "an accepted event was lost"
            assert inv.status in (QUEUED, RUNNING, SUCCEEDED, DEAD)
            if iid in self.succeeded:
                assert inv.status == SUCCEEDED
            if inv.status == RUNNING:
                assert self.running.get(iid) == inv.attempt
            assert inv.attempt <= inv.max_attempts


TestQueueMachine = QueueMachine.TestCase
TestQueueMachine.settings = __import__("hypothesis").settings(
    max_examples=60, stateful_step_count=30
)


@pytest.mark.parametrize("n", [1, 50])
def test_accept_many_is_one_transaction(tmp_path: Path, n: int) -> None:
    q = InvocationQueue(tmp_path / "q.db")
    ids = q.accept_many([Accept("f", b"{}")] * n, 0.0)
    assert len(set(ids)) == n and q.depth()["f"][QUEUED] == n


def test_the_trace_context_is_kept_with_the_event(tmp_path: Path) -> None:
    q = InvocationQueue(tmp_path / "q.db")
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    iid = q.accept("f", b"{}", 0.0, traceparent=tp)
    q.accept_many([Accept("f", b"{}", traceparent=None)], 1.0)
    (inv, plain) = q.claim("f", 1.0, 2)
    assert (inv.id, inv.traceparent) == (iid, tp) and plain.traceparent is None
    assert q.fail(iid, 1, 1.0, "boom", retry_delay=0) == QUEUED
    (again,) = q.claim("f", 1.0, 1)  # a retry delivers the same context
    assert again.traceparent == tp and again.describe()["traceparent"] == tp
    assert "traceparent" not in plain.describe()


# The schema as hourai wrote it before the store kept trace contexts (a copy, on purpose:
# a store made then must open now).
FIRST_SCHEMA = """
CREATE TABLE IF NOT EXISTS invocations (
    id TEXT PRIMARY KEY,
    function TEXT NOT NULL,
    event BLOB NOT NULL,
    source TEXT NOT NULL,
    status TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    interrupted INTEGER NOT NULL DEFAULT 0,
    accepted_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    not_before REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    status_code INTEGER,
    result BLOB,
    error TEXT,
    condition TEXT
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


def test_a_store_made_before_trace_contexts_opens_with_its_events(tmp_path: Path) -> None:
    path = tmp_path / "invocations.db"
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("PRAGMA journal_mode=WAL")
    old.executescript(FIRST_SCHEMA)
    insert = (
        "INSERT INTO invocations (id, function, event, source, status, attempt, max_attempts,"
        " accepted_at, expires_at, not_before) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    old.execute(insert, ("a" * 32, "f", b'{"n": 1}', "http", QUEUED, 0, 3, 0.0, 100.0, 0.0))
    old.execute(insert, ("b" * 32, "f", b'{"n": 2}', "api", RUNNING, 1, 3, 0.0, 100.0, 0.0))
    old.execute(
        "INSERT INTO schedules (function, expression, last_tick) VALUES ('f', 'rate(1 hour)', 5)"
    )
    # no close: the rows are in the WAL, as a daemon killed mid-flight leaves them

    q = InvocationQueue(path)
    columns = [row[1] for row in q.db.execute("PRAGMA table_info(invocations)")]
    assert columns[-1] == "traceparent"
    assert q.recover(1.0) == 1  # the running one is queued again, as before
    (first, second) = q.claim("f", 1.0, 10)
    assert {first.id, second.id} == {"a" * 32, "b" * 32}
    assert first.traceparent is None and second.traceparent is None
    assert q.succeed(first.id, first.attempt, 2.0, 200, b"{}")
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    new = q.accept("f", b"{}", 2.0, traceparent=tp)
    assert q.get(new).traceparent == tp  # type: ignore[union-attr]
    assert q.schedule_state("f") == ("rate(1 hour)", 5.0, 0, None)
    q.close()
    old.close()

    # opened again, nothing more to add, and everything still there
    again = InvocationQueue(path)
    assert [row[1] for row in again.db.execute("PRAGMA table_info(invocations)")] == columns
    assert again.get("a" * 32).status == SUCCEEDED  # type: ignore[union-attr]
    assert again.get(new).traceparent == tp  # type: ignore[union-attr]
    again.close()
