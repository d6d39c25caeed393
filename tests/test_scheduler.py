"""The scheduler's rules, one readable example each (the state machine test covers the rest)."""

from __future__ import annotations

from hourai.scheduler.core import (
    BuildSnapshot,
    Dispatch,
    DropSnapshot,
    Fail,
    Fork,
    FunctionLimits,
    Kill,
    Reject,
    Scheduler,
    TenantLimits,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def serving(limits: FunctionLimits | None = None, **kw) -> tuple[Scheduler, Clock]:  # type: ignore[no-untyped-def]
    clock = Clock()
    s = Scheduler(clock, **kw)
    assert s.deploy("f", "v1", "t", limits or FunctionLimits(spares=0)) == [
        BuildSnapshot("f", "v1")
    ]
    s.snapshot_ready("f", "v1")
    return s, clock


def of(kind: type, decisions: list) -> list:  # type: ignore[type-arg]
    return [d for d in decisions if isinstance(d, kind)]


def fork_and_ready(s: Scheduler, decisions: list) -> list[int]:  # type: ignore[type-arg]
    """Carry out every Fork in `decisions`; returns the new worker ids."""
    wids = [d.worker_id for d in of(Fork, decisions)]
    for wid in wids:
        s.worker_ready(wid)
    return wids


def test_first_request_forks_then_the_worker_is_reused_warm() -> None:
    s, _ = serving()
    out = s.submit(1, "f")
    (wid,) = [d.worker_id for d in of(Fork, out)]
    assert s.worker_ready(wid) == [Dispatch(1, wid, "fork")]
    s.finished(wid, 1)
    assert s.submit(2, "f") == [Dispatch(2, wid, "warm")]


def test_most_recently_used_idle_worker_is_picked_so_the_rest_idle_out() -> None:
    s, clock = serving()
    a = of(Fork, s.submit(1, "f"))[0].worker_id
    b = of(Fork, s.submit(2, "f"))[0].worker_id
    s.worker_ready(a)
    s.worker_ready(b)
    s.finished(a, 1)
    clock.now = 1
    s.finished(b, 2)  # b is the most recently used
    assert of(Dispatch, s.submit(3, "f")) == [Dispatch(3, b, "warm")]


def test_a_used_spare_is_refilled_after_the_dispatch() -> None:
    s = Scheduler(Clock())
    s.deploy("f", "v1", "t", FunctionLimits(spares=1))
    (spare,) = of(Fork, s.snapshot_ready("f", "v1"))  # pre-forked once the snapshot is ready
    s.worker_ready(spare.worker_id)
    out = s.submit(1, "f")
    assert out[0] == Dispatch(1, spare.worker_id, "spare")
    assert len(of(Fork, out)) == 1  # the refill comes after the dispatch


def test_requests_arriving_before_the_snapshot_are_cold() -> None:
    s = Scheduler(Clock())
    s.deploy("f", "v1", "t", FunctionLimits(spares=0))
    assert s.submit(1, "f") == []  # queued: no snapshot yet
    wid = of(Fork, s.snapshot_ready("f", "v1"))[0].worker_id
    assert s.worker_ready(wid) == [Dispatch(1, wid, "cold")]


def test_a_burst_forks_up_to_max_workers_at_once_and_all_are_answered() -> None:
    s, _ = serving(FunctionLimits(spares=0, max_workers=8, queue_max=500))
    forks = []
    for rid in range(200):
        forks += of(Fork, s.submit(rid, "f"))
    assert len(forks) == 8  # pipelined, not one at a time
    dispatched = []
    for fork in forks:
        dispatched += of(Dispatch, s.worker_ready(fork.worker_id))
    while dispatched:
        d = dispatched.pop()
        dispatched += of(Dispatch, s.finished(d.worker_id, d.request_id))
        answered = d.request_id
    assert answered is not None
    assert s.stats("f")["queued"] == 0 and s.stats("f")["inflight"] == 0


def test_a_full_queue_answers_503_naming_the_limit() -> None:
    s, _ = serving(FunctionLimits(spares=0, max_workers=1, queue_max=2))
    for rid in range(3):
        s.submit(rid, "f")  # one waits for the fork, two queue
    (reject,) = of(Reject, s.submit(99, "f"))
    assert reject.status == 503 and "queue full" in reject.reason
    assert reject.retry_after


def test_a_queue_wait_beyond_the_limit_answers_503() -> None:
    s, clock = serving(FunctionLimits(spares=0, max_workers=1, queue_timeout=2.0))
    wid = of(Fork, s.submit(1, "f"))[0].worker_id
    s.worker_ready(wid)  # busy with request 1
    s.submit(2, "f")
    clock.now = 2.5
    (reject,) = of(Reject, s.tick())
    assert reject.request_id == 2 and reject.status == 503 and "queue timeout" in reject.reason


def test_rate_limit_answers_429_with_retry_after() -> None:
    s, _ = serving(FunctionLimits(spares=0, rate=1.0, burst=1))
    s.submit(1, "f")
    (reject,) = of(Reject, s.submit(2, "f"))
    assert reject.status == 429 and 0 < reject.retry_after <= 1.0


def test_tenant_inflight_cap_holds_across_functions() -> None:
    s, _ = serving(FunctionLimits(spares=0))
    s.deploy("g", "v1", "t", FunctionLimits(spares=0))
    s.snapshot_ready("g", "v1")
    s.set_tenant_limits("t", TenantLimits(max_inflight=1))
    fork_and_ready(s, s.submit(1, "f"))
    out = s.submit(2, "g")
    fork_and_ready(s, out)
    assert s.stats("f")["inflight"] + s.stats("g")["inflight"] == 1


def test_invocation_timeout_kills_the_worker_and_answers_504() -> None:
    s, clock = serving(FunctionLimits(spares=0, timeout=1.0))
    wid = of(Fork, s.submit(1, "f"))[0].worker_id
    s.worker_ready(wid)
    clock.now = 1.5
    out = s.tick()
    assert Kill(wid, "timeout") in out
    (fail,) = of(Fail, out)
    assert fail.status == 504 and "timed out" in fail.reason


def test_crash_loop_backs_off_with_the_last_error_then_recovers() -> None:
    s, clock = serving(FunctionLimits(spares=0), crash_loop_threshold=3, backoff_initial=1.0)
    for rid in range(3):
        wid = of(Fork, s.submit(rid, "f"))[0].worker_id
        s.worker_ready(wid)
        (fail,) = of(Fail, s.worker_died(wid, "segfault"))
        assert fail.status == 502
    (reject,) = of(Reject, s.submit(10, "f"))
    assert reject.status == 503 and "segfault" in reject.reason and reject.retry_after
    clock.now = 1.5
    s.tick()
    wid = of(Fork, s.submit(11, "f"))[0].worker_id  # one trial after the backoff
    assert of(Dispatch, s.worker_ready(wid)) == [Dispatch(11, wid, "fork")]
    s.finished(wid, 11)
    assert s.stats("f")["state"] == "serving"


def test_a_worker_is_recycled_after_max_requests() -> None:
    s, _ = serving(FunctionLimits(spares=0, max_requests=2))
    wid = of(Fork, s.submit(1, "f"))[0].worker_id
    s.worker_ready(wid)
    s.finished(wid, 1)
    s.submit(2, "f")
    assert Kill(wid, "recycle") in s.finished(wid, 2)


def test_new_version_switches_traffic_and_drains_the_old_one() -> None:
    s, _ = serving()
    old = of(Fork, s.submit(1, "f"))[0].worker_id
    s.worker_ready(old)  # busy on v1
    assert of(BuildSnapshot, s.deploy("f", "v2", "t", FunctionLimits(spares=0))) == [
        BuildSnapshot("f", "v2")
    ]
    s.snapshot_ready("f", "v2")
    new = of(Fork, s.submit(2, "f"))
    assert new and new[0].version == "v2"  # new requests go to the new version
    out = s.finished(old, 1)  # the old worker finishes what it held, then goes
    assert Kill(old, "drained") in out
    assert DropSnapshot("f", "v1") in out


def test_a_version_that_fails_to_build_is_refused_and_the_old_keeps_serving() -> None:
    s, _ = serving()
    s.deploy("f", "v2", "t", FunctionLimits(spares=0))
    s.snapshot_failed("f", "v2", "SyntaxError")
    assert s.stats("f")["version"] == "v1"
    wid = of(Fork, s.submit(1, "f"))[0].worker_id
    assert of(Dispatch, s.worker_ready(wid)) == [Dispatch(1, wid, "fork")]


def test_remove_answers_queued_requests_and_drops_everything() -> None:
    s, _ = serving(FunctionLimits(spares=0, max_workers=1))
    wid = of(Fork, s.submit(1, "f"))[0].worker_id
    s.worker_ready(wid)
    s.submit(2, "f")
    out = s.remove("f")
    assert {d.request_id for d in of(Reject, out)} == {2}
    assert {d.request_id for d in of(Fail, out)} == {1}
    assert Kill(wid, "removed") in out
    assert DropSnapshot("f", "v1") in out
