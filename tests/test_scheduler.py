"""The scheduler core, rule by rule: what a request gets, and what the shell is told to do."""

from __future__ import annotations

from typing import Any

import pytest

from hourai.scheduler.core import (
    BuildSnapshot,
    Decision,
    Dispatch,
    DropSnapshot,
    Fail,
    Fork,
    FunctionLimits,
    FunctionState,
    Kill,
    Reject,
    Scheduler,
    TenantLimits,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def of(kind: type, decisions: list[Decision]) -> list:
    return [d for d in decisions if isinstance(d, kind)]


def forks(decisions: list[Decision]) -> list[int]:
    return [d.worker_id for d in decisions if isinstance(d, Fork)]


class Recorder:
    """The scheduler, remembering what the shell would: who holds which request, and every
    worker forked."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._s = scheduler
        self.where: dict[int, int] = {}
        self.forked: list[int] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._s, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            out = attr(*args, **kwargs)
            if isinstance(out, list):
                for d in out:
                    if isinstance(d, Dispatch):
                        self.where[d.request_id] = d.worker_id
                    elif isinstance(d, Fork):
                        self.forked.append(d.worker_id)
            return out

        return call


class Host:
    """A scheduler with a fake clock and a few shortcuts for the shell's side."""

    def __init__(self, **kwargs: Any) -> None:
        self.clock = Clock()
        self.s = Recorder(Scheduler(self.clock, **kwargs))
        self.rid = 0

    def serving(self, fn: str = "f", limits: FunctionLimits | None = None, tenant: str = "t"):
        """Deploy and build ``fn``; bring its spares up. Returns the spares' worker ids."""
        lim = limits or FunctionLimits()
        assert self.s.deploy(fn, "v1", tenant, lim) == [BuildSnapshot(fn, "v1")]
        spares = forks(self.s.snapshot_ready(fn, "v1"))
        for wid in spares:
            assert self.s.worker_ready(wid) == []
        return spares

    def submit(self, fn: str = "f") -> tuple[int, list[Decision]]:
        self.rid += 1
        return self.rid, self.s.submit(self.rid, fn)

    def warm_workers(self, fn: str, n: int) -> list[int]:
        """Get ``n`` workers up and idle (by running one request on each)."""
        rids, wids = [], []
        for _ in range(n):
            rid, out = self.submit(fn)
            rids.append(rid)
            for wid in forks(out):
                self.s.worker_ready(wid)
        for rid in rids:
            wid = self.worker_of(fn, rid)
            wids.append(wid)
        for rid, wid in zip(rids, wids, strict=True):
            self.s.finished(wid, rid)
        return wids

    def worker_of(self, fn: str, rid: int) -> int:
        return self.s.where[rid]

    def advance(self, seconds: float) -> list[Decision]:
        self.clock.now += seconds
        return self.s.tick()


# --------------------------------------------------------------------------- start paths


def test_request_during_the_first_build_is_dispatched_cold_when_its_fork_is_ready() -> None:
    h = Host()
    h.s.deploy("f", "v1", "t", FunctionLimits(spares=0))
    rid, out = h.submit()
    assert out == []  # queued: nothing to fork from yet
    out = h.s.snapshot_ready("f", "v1")
    assert out[0] == FunctionState("f", "serving", "version v1 ready")
    [wid] = forks(out)
    assert h.s.worker_ready(wid) == [Dispatch(rid, wid, "cold")]


def test_spare_hit_dispatches_first_then_forks_a_replacement() -> None:
    h = Host()
    [spare] = h.serving()
    rid, out = h.submit()
    assert out[0] == Dispatch(rid, spare, "spare")  # the invocation goes out first
    assert len(forks(out)) == 1
    assert h.s.stats("f")["workers"]["spare"] == 0
    assert h.s.worker_ready(forks(out)[0]) == []
    assert h.s.stats("f")["workers"]["spare"] == 1


def test_snapshot_hit_forks_and_dispatches_on_worker_ready() -> None:
    h = Host()
    h.serving(limits=FunctionLimits(spares=0))
    rid, out = h.submit()
    [wid] = forks(out)
    assert h.s.worker_ready(wid) == [Dispatch(rid, wid, "fork")]
    assert h.s.finished(wid, rid) == []
    rid2, out = h.submit()
    assert out == [Dispatch(rid2, wid, "warm")]
    assert h.s.stats("f")["starts"] == {"warm": 1, "spare": 0, "fork": 1, "cold": 0}


def test_warm_reuse_picks_the_most_recently_used_worker_and_the_rest_idle_out() -> None:
    h = Host()
    h.serving(limits=FunctionLimits(spares=0, keep_alive=60))
    w1, w2 = h.warm_workers("f", 2)
    # w2 finished last, so it is the most recently used; keep using only it.
    for _ in range(5):
        h.clock.now += 20
        rid, out = h.submit()
        assert out == [Dispatch(rid, w2, "warm")]
        h.s.finished(w2, rid)
    # w1 went idle 100 s ago: reaped; w2 stays.
    assert h.advance(0) == [Kill(w1, "idle")]
    stats = h.s.stats("f")
    assert stats["workers"]["idle"] == 1
    assert stats["kills"] == {"idle": 1}


def test_idle_worker_is_reaped_at_keep_alive_exactly_and_next_deadline_says_when() -> None:
    h = Host()
    h.serving(limits=FunctionLimits(spares=0, keep_alive=5))
    [w] = h.warm_workers("f", 1)
    assert h.s.next_deadline() == pytest.approx(h.clock.now + 5)
    assert h.advance(4.999) == []
    assert h.advance(0.001) == [Kill(w, "idle")]
    assert h.s.next_deadline() is None
    # Scale to zero keeps the snapshot: the next request is a fork, not a build.
    _, out = h.submit()
    assert of(BuildSnapshot, out) == [] and len(forks(out)) == 1


# --------------------------------------------------------------------------- bursts


def test_burst_of_200_forks_max_workers_at_once_and_every_request_is_answered() -> None:
    h = Host()
    h.serving(limits=FunctionLimits(spares=0, max_workers=8, queue_max=256))
    started: list[int] = []
    for _ in range(200):
        _, out = h.submit()
        assert not of(Reject, out)
        started += forks(out)
    assert len(started) == 8  # pipelined: all forks requested before any is ready
    answered: set[int] = set()
    running: dict[int, int] = {}  # request -> worker
    pending = list(started)
    while len(answered) < 200:
        out = h.s.worker_ready(pending.pop()) if pending else []
        for d in of(Dispatch, out):
            running[d.request_id] = d.worker_id
        rid = next(iter(running))
        wid = running.pop(rid)
        answered.add(rid)
        for d in of(Dispatch, h.s.finished(wid, rid)):
            running[d.request_id] = d.worker_id
    assert answered == set(range(1, 201))
    stats = h.s.stats("f")
    assert stats["forks"] == 8 and stats["completed"] == 200 and stats["queued"] == 0


def test_burst_during_the_build_forks_for_all_of_it_when_the_snapshot_is_ready() -> None:
    h = Host()
    h.s.deploy("f", "v1", "t", FunctionLimits(spares=1, max_workers=4))
    for _ in range(10):
        h.submit()
    assert len(forks(h.s.snapshot_ready("f", "v1"))) == 4


def test_queued_requests_are_served_fifo_as_workers_free_up() -> None:
    h = Host()
    h.serving(limits=FunctionLimits(spares=0, max_workers=1))
    rids = [h.submit()[0] for _ in range(4)]
    wid = h.s.stats("f")["forks"]
    order = [d.request_id for d in h.s.worker_ready(wid)]
    while len(order) < 4:
        order += [d.request_id for d in h.s.finished(wid, order[-1])]
    assert order == rids


def test_requests_sent_ahead_to_workers_that_die_go_back_in_arrival_order() -> None:
    h = Host(send_ahead=True)
    h.serving(limits=FunctionLimits(spares=0, max_workers=2))
    h.warm_workers("f", 2)
    for _ in range(4):  # answered by warm workers: the function's service time is known
        rid, _ = h.submit()
        h.s.finished(h.worker_of("f", rid), rid)
    h.submit()  # one running on each worker
    h.submit()
    r3, o3 = h.submit()
    r4, o4 = h.submit()
    ahead = {d.request_id: d.worker_id for d in of(Dispatch, o3 + o4) if d.ahead}
    assert set(ahead) == {r3, r4}, (o3, o4)
    # the worker holding the older request dies first
    out = h.s.worker_died(ahead[r3], "exit 1") + h.s.worker_died(ahead[r4], "exit 1")
    order = []
    for wid in forks(out):
        order += [d.request_id for d in h.s.worker_ready(wid) if isinstance(d, Dispatch)]
    assert order == [r3, r4]


def test_cancelled_queued_request_is_skipped_and_its_fork_becomes_a_spare() -> None:
    h = Host()
    h.serving(limits=FunctionLimits(spares=1, max_workers=3))
    busy, _ = h.submit()  # takes the spare
    rid, _ = h.submit()  # queued, with a fork on its way
    assert h.s.cancel(rid) == []
    assert h.s.stats("f")["queued"] == 0
    for wid in h.s.forked:
        h.s.worker_ready(wid)
    assert h.s.stats("f")["workers"] == {
        "starting": 0,
        "spare": 1,
        "idle": 1,
        "busy": 1,
        "draining": 0,
    }
    assert h.s.stats("f")["cancelled"] == 1
    assert h.s.cancel(busy) == []  # running: its worker finishes it


# --------------------------------------------------------------------------- overload


def test_full_queue_is_refused_with_503_naming_the_limit() -> None:
    h = Host()
    h.serving(limits=FunctionLimits(spares=0, max_workers=1, queue_max=2))
    h.submit()
    h.submit()
    rid, out = h.submit()
    assert out == [
        Reject(
            rid,
            503,
            "queue full (2 waiting): all 1 workers (max_workers) are busy",
            1.0,
        )
    ]
    assert h.s.stats("f")["rejections"] == {"queue_full": 1}


def test_request_waiting_longer_than_queue_timeout_gets_503() -> None:
    h = Host()
    h.serving(limits=FunctionLimits(spares=0, max_workers=1, queue_timeout=10, timeout=60))
    _, out = h.submit()
    [wid] = forks(out)
    h.s.worker_ready(wid)  # busy with the first request
    h.clock.now += 1
    waiting, _ = h.submit()
    assert h.s.next_deadline() == pytest.approx(h.clock.now + 10)
    assert h.advance(9.9) == []
    out = h.advance(0.1)
    assert len(out) == 1 and out[0].request_id == waiting and out[0].status == 503
    assert out[0].reason.startswith("queue timeout after 10s")
    assert out[0].retry_after == 1.0


def test_rate_limit_answers_429_with_seconds_until_the_next_token() -> None:
    h = Host()
    h.serving(limits=FunctionLimits(rate=2.0, burst=2, max_workers=4))
    assert not of(Reject, h.submit()[1])
    assert not of(Reject, h.submit()[1])
    rid, out = h.submit()
    assert out == [
        Reject(rid, 429, "rate limit exceeded: function 'f' allows 2 requests/s (burst 2)", 0.5)
    ]
    h.clock.now += 0.5
    assert not of(Reject, h.submit()[1])


def test_tenant_rate_limit_is_shared_by_its_functions() -> None:
    h = Host()
    h.serving("a", tenant="acme")
    h.serving("b", tenant="acme")
    h.s.set_tenant_limits("acme", TenantLimits(rate=1.0))
    assert not of(Reject, h.submit("a")[1])
    _, out = h.submit("b")
    assert out[0].status == 429 and "tenant 'acme'" in out[0].reason
    assert out[0].retry_after == pytest.approx(1.0)


def test_function_max_inflight_holds_requests_in_the_queue() -> None:
    h = Host()
    h.serving(limits=FunctionLimits(spares=2, max_workers=4, max_inflight=1))
    first, out = h.submit()
    [d] = of(Dispatch, out)
    second, out = h.submit()
    assert of(Dispatch, out) == [] and h.s.stats("f")["queued"] == 1
    out = h.s.finished(d.worker_id, first)
    assert [x.request_id for x in of(Dispatch, out)] == [second]


def test_tenant_max_inflight_is_handed_to_the_tenants_other_function_when_freed() -> None:
    h = Host()
    h.serving("a", tenant="acme")
    h.serving("b", tenant="acme")
    h.s.set_tenant_limits("acme", TenantLimits(max_inflight=1))
    ra, out = h.submit("a")
    [da] = of(Dispatch, out)
    rb, out = h.submit("b")
    assert of(Dispatch, out) == []  # b has a spare, but the tenant is at its cap
    out = h.s.finished(da.worker_id, ra)
    assert [d.request_id for d in of(Dispatch, out)] == [rb]


def test_raising_the_tenant_cap_dispatches_what_waited_for_it() -> None:
    h = Host()
    h.serving("a", tenant="acme", limits=FunctionLimits(spares=2))
    h.s.set_tenant_limits("acme", TenantLimits(max_inflight=1))
    h.submit("a")
    rid, out = h.submit("a")
    assert of(Dispatch, out) == []
    out = h.s.set_tenant_limits("acme", TenantLimits(max_inflight=2))
    assert [d.request_id for d in of(Dispatch, out)] == [rid]


# --------------------------------------------------------------------------- thread mode


def test_thread_mode_packs_a_worker_before_using_another() -> None:
    h = Host()
    h.serving(limits=FunctionLimits(spares=0, concurrency=3, max_workers=2))
    rid, out = h.submit()
    [wid] = forks(out)
    h.s.worker_ready(wid)
    outs = [h.submit()[1] for _ in range(2)]
    assert [d.worker_id for o in outs for d in of(Dispatch, o)] == [wid, wid]
    rid4, out = h.submit()
    assert of(Dispatch, out) == [] and len(forks(out)) == 1  # full: the fourth needs a fork
    # A finish frees a slot, which the queued request takes at once.
    out = h.s.finished(wid, rid)
    assert of(Dispatch, out) == [Dispatch(rid4, wid, "warm")]


# --------------------------------------------------------------------------- health


def test_invocation_timeout_kills_the_worker_and_answers_504() -> None:
    h = Host()
    h.serving(limits=FunctionLimits(spares=0, timeout=30))
    rid, out = h.submit()
    [wid] = forks(out)
    h.s.worker_ready(wid)
    assert h.s.next_deadline() == pytest.approx(h.clock.now + 30)
    assert h.advance(29.9) == []
    assert h.advance(0.1) == [Fail(rid, 504, "function timed out after 30s"), Kill(wid, "timeout")]
    # The late answer of the killed worker is ignored.
    assert h.s.finished(wid, rid) == [] and h.s.worker_died(wid, "killed") == []


def test_worker_death_fails_its_request_with_502_and_a_replacement_is_forked() -> None:
    h = Host()
    h.serving(limits=FunctionLimits(spares=0, max_workers=1))
    rid, out = h.submit()
    [wid] = forks(out)
    h.s.worker_ready(wid)
    queued, _ = h.submit()
    out = h.s.worker_died(wid, "killed by signal 9")
    assert out[0] == Fail(rid, 502, "worker died: killed by signal 9")
    [replacement] = forks(out)  # for the queued request
    assert h.s.worker_ready(replacement) == [Dispatch(queued, replacement, "fork")]


def _crash_loop(h: Host) -> tuple[int, list[Decision]]:
    """Three deaths in a row; returns a request that was queued, and the last decisions."""
    out: list[Decision] = []
    queued = 0
    for i in range(3):
        rid, o = h.submit()
        for wid in forks(o):
            h.s.worker_ready(wid)
        if i == 2:
            queued, _ = h.submit()
        out = h.s.worker_died(h.worker_of("f", rid), "exit status 1")
    return queued, out


def test_crash_loop_backs_off_then_allows_one_trial_and_recovers() -> None:
    h = Host(crash_loop_threshold=3, backoff_initial=1.0, backoff_max=60.0)
    h.serving(limits=FunctionLimits(spares=0, max_workers=1))
    queued, out = _crash_loop(h)
    reason = "function 'f' is crash-looping; last error: worker died: exit status 1; retrying in 1s"
    assert Reject(queued, 503, reason, 1.0) in out
    assert FunctionState("f", "backoff", reason) in out
    rid, out = h.submit()
    assert out == [Reject(rid, 503, reason, 1.0)]
    assert h.s.next_deadline() == pytest.approx(h.clock.now + 1)
    h.advance(1.0)
    assert h.s.stats("f")["state"] == "trial"
    # One request at a time until one succeeds.
    trial, out = h.submit()
    [wid] = forks(out)
    second, out = h.submit()
    assert out == []  # waits for the trial
    assert h.s.worker_ready(wid) == [Dispatch(trial, wid, "fork")]
    out = h.s.finished(wid, trial)
    assert FunctionState("f", "serving", "recovered from crash loop") in out
    assert Dispatch(second, wid, "warm") in out
    assert h.s.stats("f")["state"] == "serving"


def test_failed_trial_doubles_the_backoff_up_to_the_maximum() -> None:
    h = Host(crash_loop_threshold=1, backoff_initial=1.0, backoff_max=3.0)
    h.serving(limits=FunctionLimits(spares=0))
    lengths = []
    for _ in range(4):
        rid, out = h.submit()
        for wid in forks(out):
            h.s.worker_ready(wid)
        h.s.worker_died(h.worker_of("f", rid), "exit status 1")
        lengths.append(h.s.stats("f")["backoff_remaining"])
        h.advance(lengths[-1])
    assert lengths == [1.0, 2.0, 3.0, 3.0]


def _fresh_worker_for(h: Host, fn: str = "f") -> tuple[int, int]:
    """A request on a worker forked for it (its first invocation): (request, worker)."""
    rid, out = h.submit(fn)
    for wid in forks(out):
        h.s.worker_ready(wid)
    return rid, h.worker_of(fn, rid)


def test_timeouts_never_back_off_and_the_next_cheap_request_is_served() -> None:
    h = Host(crash_loop_threshold=1)
    h.serving(limits=FunctionLimits(spares=0, timeout=1))
    for _ in range(3):
        rid, wid = _fresh_worker_for(h)  # each on its first invocation
        out = h.advance(1)
        assert out[:2] == [Fail(rid, 504, "function timed out after 1s"), Kill(wid, "timeout")]
        assert not of(FunctionState, out)
    stats = h.s.stats("f")
    assert (stats["state"], stats["timeouts"], stats["crashes"]) == ("serving", 3, 0)
    assert stats["last_error"] == "timed out after 1s"
    cheap, wid = _fresh_worker_for(h)
    assert h.s.finished(wid, cheap) == []  # answered by its worker, nothing refused


def test_oom_kills_never_back_off_even_on_a_first_invocation() -> None:
    h = Host(crash_loop_threshold=1)
    h.serving(limits=FunctionLimits(spares=0))
    for _ in range(3):
        rid, wid = _fresh_worker_for(h)
        out = h.s.worker_died(wid, "killed by the kernel's OOM killer", oom=True)
        assert out == [Fail(rid, 502, "worker died: killed by the kernel's OOM killer")]
    stats = h.s.stats("f")
    assert (stats["state"], stats["oom_kills"], stats["died"]) == ("serving", 3, 3)
    cheap, wid = _fresh_worker_for(h)
    assert h.s.finished(wid, cheap) == []


def test_death_of_a_worker_that_has_served_is_one_invocations_502_not_a_crash() -> None:
    h = Host(crash_loop_threshold=1)
    h.serving(limits=FunctionLimits(spares=0, max_workers=1))
    for _ in range(3):
        [w] = h.warm_workers("f", 1)
        rid, out = h.submit()
        assert out == [Dispatch(rid, w, "warm")]
        assert h.s.worker_died(w, "killed by signal 11") == [
            Fail(rid, 502, "worker died: killed by signal 11")
        ]
    assert h.s.stats("f")["state"] == "serving"


def test_deaths_at_start_back_off_a_spare_that_dies_and_failed_forks_included() -> None:
    h = Host(crash_loop_threshold=3)
    [spare] = h.serving(limits=FunctionLimits(spares=1, max_workers=2))
    out = h.s.worker_died(spare, "exit status 1")  # before any invocation
    [again] = forks(out)
    h.s.fork_failed(again, "fork: Resource temporarily unavailable")
    assert h.s.stats("f")["crashes"] == 2
    _rid, wid = _fresh_worker_for(h)
    out = h.s.worker_died(wid, "exit status 1")  # at its first invocation
    reason = "function 'f' is crash-looping; last error: worker died: exit status 1; retrying in 1s"
    assert FunctionState("f", "backoff", reason) in out
    assert h.s.stats("f")["state"] == "backoff"


def test_repeated_snapshot_rebuild_failures_back_off() -> None:
    h = Host(crash_loop_threshold=3)
    h.serving(limits=FunctionLimits(spares=0))
    h.warm_workers("f", 1)
    h.s.snapshot_lost("f", "v1", "killed by signal 9")
    rid, out = h.submit()
    assert out == [BuildSnapshot("f", "v1")]
    out = h.s.snapshot_failed("f", "v1", "MemoryError")
    assert out == [BuildSnapshot("f", "v1")]  # the request still waits for it
    h.s.snapshot_failed("f", "v1", "MemoryError")
    out = h.s.snapshot_failed("f", "v1", "MemoryError")
    reason = (
        "function 'f' is crash-looping; last error: snapshot rebuild failed: MemoryError; "
        "retrying in 1s"
    )
    assert Reject(rid, 503, reason, 1.0) in out
    assert FunctionState("f", "backoff", reason) in out


def test_a_trial_that_times_out_shows_the_function_starts_and_ends_the_backoff() -> None:
    h = Host(crash_loop_threshold=3, backoff_initial=1.0)
    h.serving(limits=FunctionLimits(spares=0, max_workers=1, timeout=5))
    _crash_loop(h)
    h.advance(1.0)
    assert h.s.stats("f")["state"] == "trial"
    _fresh_worker_for(h)
    out = h.advance(5)
    assert FunctionState("f", "serving", "recovered from crash loop") in out
    assert h.s.stats("f")["state"] == "serving"


def test_a_successful_finish_resets_the_crash_count() -> None:
    h = Host(crash_loop_threshold=2)
    h.serving(limits=FunctionLimits(spares=0))
    for _ in range(3):
        r1, out = h.submit()
        for wid in forks(out):
            h.s.worker_ready(wid)
        h.s.worker_died(h.worker_of("f", r1), "exit status 1")
        r2, out = h.submit()
        for wid in forks(out):
            h.s.worker_ready(wid)
        h.s.finished(h.worker_of("f", r2), r2)
    assert h.s.stats("f")["state"] == "serving"


def test_worker_is_recycled_after_max_requests_and_replaced_on_demand() -> None:
    h = Host()
    h.serving(limits=FunctionLimits(spares=0, max_requests=2))
    [wid] = h.warm_workers("f", 1)
    rid, out = h.submit()
    assert out == [Dispatch(rid, wid, "warm")]
    assert h.s.finished(wid, rid) == [Kill(wid, "recycle")]
    rid, out = h.submit()
    assert len(forks(out)) == 1


def test_worker_over_its_memory_limit_is_recycled_once_idle() -> None:
    h = Host()
    h.serving(limits=FunctionLimits(spares=0, max_worker_memory=100 << 20))
    rid, out = h.submit()
    [wid] = forks(out)
    h.s.worker_ready(wid)
    assert h.s.worker_memory(wid, 50 << 20) == []
    assert h.s.worker_memory(wid, 150 << 20) == []  # busy: finish first
    assert h.s.finished(wid, rid) == [Kill(wid, "memory")]
    # An idle one goes at once.
    [w2] = h.warm_workers("f", 1)
    assert h.s.worker_memory(w2, 150 << 20) == [Kill(w2, "memory")]


# --------------------------------------------------------------------------- versions


def test_new_version_takes_over_when_ready_and_old_workers_drain() -> None:
    h = Host()
    h.serving(limits=FunctionLimits(spares=1, max_workers=4))
    idle, busy = h.warm_workers("f", 2)
    spare = h.s.forked[-1]
    assert h.s.stats("f")["workers"]["spare"] == 1
    rid, out = h.submit()
    assert out == [Dispatch(rid, busy, "warm")]
    assert h.s.deploy("f", "v2", "t", FunctionLimits(spares=1, max_workers=4)) == [
        BuildSnapshot("f", "v2")
    ]
    # Until v2 is ready, v1 serves.
    r2, out = h.submit()
    assert out == [Dispatch(r2, idle, "warm")]
    h.s.finished(idle, r2)
    out = h.s.snapshot_ready("f", "v2")
    assert Kill(idle, "drained") in out and Kill(spare, "drained") in out
    assert {d.version for d in of(Fork, out)} == {"v2"}
    assert not of(DropSnapshot, out)  # the busy v1 worker still needs its snapshot
    assert h.s.stats("f")["workers"]["draining"] == 1
    out = h.s.finished(busy, rid)
    assert out == [Kill(busy, "drained"), DropSnapshot("f", "v1")]


def test_queued_requests_go_to_the_new_version() -> None:
    lim = FunctionLimits(spares=0, max_workers=2)
    h = Host()
    h.serving(limits=lim)
    _, out = h.submit()
    [w1] = forks(out)
    h.s.worker_ready(w1)
    r2, out = h.submit()
    [w2] = forks(out)  # a v1 worker on its way for r2
    h.s.deploy("f", "v2", "t", lim)
    out = h.s.snapshot_ready("f", "v2")
    # Both v1 workers still count toward max_workers, so v2 waits for one to go.
    assert of(Fork, out) == []
    out = h.s.worker_ready(w2)
    assert out[0] == Kill(w2, "drained")
    [fork] = of(Fork, out)
    assert fork.version == "v2"
    assert h.s.worker_ready(fork.worker_id) == [Dispatch(r2, fork.worker_id, "fork")]


def test_failed_new_version_is_refused_and_the_old_one_keeps_serving() -> None:
    h = Host()
    h.serving(limits=FunctionLimits(spares=0))
    [wid] = h.warm_workers("f", 1)
    h.s.deploy("f", "v2", "t", FunctionLimits(spares=0))
    out = h.s.snapshot_failed("f", "v2", "SyntaxError: invalid syntax (app.py, line 3)")
    assert out == [
        FunctionState(
            "f", "serving", "version v2 refused: SyntaxError: invalid syntax (app.py, line 3)"
        )
    ]
    rid, out = h.submit()
    assert out == [Dispatch(rid, wid, "warm")]
    assert h.s.stats("f")["version"] == "v1"


def test_failed_first_version_refuses_requests_naming_the_error_until_redeployed() -> None:
    h = Host()
    h.s.deploy("f", "v1", "t", FunctionLimits())
    queued, _ = h.submit()
    out = h.s.snapshot_failed("f", "v1", "ModuleNotFoundError: No module named 'flask'")
    reason = "function 'f' failed to start: ModuleNotFoundError: No module named 'flask'"
    assert out == [
        Reject(queued, 503, reason, None),
        FunctionState("f", "failed", "ModuleNotFoundError: No module named 'flask'"),
    ]
    rid, out = h.submit()
    assert out == [Reject(rid, 503, reason, None)]
    assert h.s.deploy("f", "v1", "t", FunctionLimits()) == [BuildSnapshot("f", "v1")]
    assert h.s.stats("f")["state"] == "building"


def test_lost_snapshot_is_rebuilt_on_demand_and_its_workers_deaths_are_not_crashes() -> None:
    h = Host(crash_loop_threshold=1)
    h.serving(limits=FunctionLimits(spares=1))
    idle, busy = h.warm_workers("f", 2)
    rid, out = h.submit()
    assert out == [Dispatch(rid, busy, "warm")]
    out = h.s.snapshot_lost("f", "v1", "killed by signal 9")
    assert Kill(idle, "lost") in out and not of(BuildSnapshot, out)
    out = h.s.worker_died(busy, "killed by signal 9")
    assert out == [Fail(rid, 502, "worker died: killed by signal 9")]
    assert h.s.stats("f")["state"] == "serving"
    r2, out = h.submit()
    assert out == [BuildSnapshot("f", "v1")]
    [wid] = forks(h.s.snapshot_ready("f", "v1"))[:1]
    assert h.s.worker_ready(wid) == [Dispatch(r2, wid, "cold")]


def test_new_version_while_a_lost_snapshot_rebuilds_drops_the_rebuild() -> None:
    h = Host()
    h.serving(limits=FunctionLimits(spares=0))
    [w] = h.warm_workers("f", 1)
    rid, _ = h.submit()
    h.s.snapshot_lost("f", "v1", "gone")  # w is busy: it drains until the shell reports it
    h.submit()  # needs the snapshot back
    out = h.s.deploy("f", "v2", "t", FunctionLimits(spares=0))
    # The rebuild of v1 owes nothing to the worker of the lost v1 snapshot.
    assert out == [DropSnapshot("f", "v1"), BuildSnapshot("f", "v2")]
    assert h.s.worker_died(w, "gone") == [Fail(rid, 502, "worker died: gone")]


def test_rollback_to_a_draining_version_reuses_its_snapshot() -> None:
    h = Host()
    h.serving(limits=FunctionLimits(spares=0))
    [w] = h.warm_workers("f", 1)
    rid, _ = h.submit()
    h.s.deploy("f", "v2", "t", FunctionLimits(spares=0))
    h.s.snapshot_ready("f", "v2")
    out = h.s.deploy("f", "v1", "t", FunctionLimits(spares=0))
    assert not of(BuildSnapshot, out)
    assert DropSnapshot("f", "v2") in out
    assert h.s.stats("f")["version"] == "v1"
    # The v1 worker that was draining still finishes and goes; the v1 snapshot stays.
    assert h.s.finished(w, rid) == [Kill(w, "drained")]


def test_remove_answers_everything_and_stops_every_worker_and_snapshot() -> None:
    h = Host()
    [spare] = h.serving(limits=FunctionLimits(spares=1, max_workers=1))
    running, out = h.submit()
    queued, _ = h.submit()
    h.s.deploy("f", "v2", "t", FunctionLimits(spares=1, max_workers=1))
    out = h.s.remove("f")
    assert out == [
        Reject(queued, 503, "function 'f' was removed", None),
        Fail(running, 503, "function 'f' was removed while the request was running"),
        Kill(spare, "removed"),
        DropSnapshot("f", "v1"),
        DropSnapshot("f", "v2"),
        FunctionState("f", "removed", ""),
    ]
    assert h.s.functions() == []
    rid, out = h.submit()
    assert out == [Reject(rid, 404, "no function named 'f' is deployed", None)]
    assert h.s.next_deadline() is None


# --------------------------------------------------------------------------- the host


def test_full_host_evicts_another_functions_least_recently_used_idle_worker() -> None:
    h = Host(max_host_workers=2)
    h.serving("a", limits=FunctionLimits(spares=0))
    h.serving("b", limits=FunctionLimits(spares=0))
    older, _ = h.warm_workers("a", 2)
    rid, out = h.submit("b")
    assert out[0] == Kill(older, "evicted")
    [wid] = forks(out)
    assert h.s.worker_ready(wid) == [Dispatch(rid, wid, "fork")]


def test_full_host_of_busy_workers_queues_until_one_frees() -> None:
    h = Host(max_host_workers=1)
    h.serving("a", limits=FunctionLimits(spares=0))
    h.serving("b", limits=FunctionLimits(spares=0))
    ra, out = h.submit("a")
    [wa] = forks(out)
    h.s.worker_ready(wa)
    rb, out = h.submit("b")
    assert out == []
    # a's worker goes idle: b needs the room more than a needs a warm worker.
    out = h.s.finished(wa, ra)
    assert out[0] == Kill(wa, "evicted")
    [wb] = forks(out)
    assert h.s.worker_ready(wb) == [Dispatch(rb, wb, "fork")]


def test_memory_policy_can_unload_an_idle_function_and_prewarm_it() -> None:
    h = Host()
    h.serving(limits=FunctionLimits(spares=1))
    [w] = h.warm_workers("f", 1)  # took the first spare; a second one was forked
    spare = h.s.forked[-1]
    assert h.s.evict_idle("f", 1) == [Kill(w, "evicted")]
    assert h.s.unload("f") == [Kill(spare, "unloaded"), DropSnapshot("f", "v1")]
    assert h.s.stats("f")["snapshot"] == "absent"
    assert h.s.prewarm("f") == [BuildSnapshot("f", "v1")]
    assert len(forks(h.s.snapshot_ready("f", "v1"))) == 1  # the spare comes back


def test_unload_leaves_a_function_with_work_in_flight_alone() -> None:
    h = Host()
    h.serving()
    h.submit()
    assert h.s.unload("f") == []


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_workers": 0}, "max_workers must be at least 1"),
        ({"timeout": 0}, "timeout must be greater than 0"),
        ({"spares": 3, "max_workers": 2}, "spares (3) cannot exceed max_workers (2)"),
        ({"burst": 5}, "burst must come with a rate"),
        ({"rate": -1.0}, "rate must be greater than 0"),
    ],
)
def test_nonsense_limits_are_refused_with_a_message(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FunctionLimits(**kwargs)


def test_redeploying_the_same_version_only_updates_limits() -> None:
    h = Host()
    h.serving(limits=FunctionLimits(spares=1))
    assert h.s.deploy("f", "v1", "t", FunctionLimits(spares=1, queue_max=3)) == []
    out = h.s.deploy("f", "v1", "t", FunctionLimits(spares=2))
    assert len(forks(out)) == 1


def test_request_ids_may_not_be_reused_while_live() -> None:
    h = Host()
    h.serving()
    h.s.submit(1, "f")
    with pytest.raises(ValueError, match="already in use"):
        h.s.submit(1, "f")
