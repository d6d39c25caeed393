"""The scheduler under random schedules of events, against a model of the daemon around it.

The model plays the shell: it carries out every decision (remembers which worker holds which
request, which forks and snapshot builds are in flight) and answers them at random (ready or
failed), while hypothesis interleaves deploys, requests, cancels, deaths, timeouts, memory
reports, limit changes and removals. After every step the invariants of the scheduler hold:

1. every request is answered exactly once, and none is left unanswered after draining;
2. a function never has more than max_workers workers, the host never more than
   max_host_workers (and the scheduler's counts agree with the shell's);
3. no worker is idle or has a free slot while its function's queue is non-empty, unless an
   in-flight cap or a backoff holds the queue; a queue that could move has forks on the way;
4. each function's requests are dispatched in arrival order;
5. function and tenant in-flight caps hold at every dispatch;
6. a Dispatch targets a ready worker of that function with a free slot; no decision names a
   worker or snapshot the shell does not have;
7. next_deadline() is never later than something tick() acts on;
8. only crashes back off: a function enters backoff only on a failure to start (a failed
   fork, the death of a worker that has answered nothing, not by the OOM killer, a failed
   snapshot build), never on a timeout, an OOM kill or the death of a worker that served.

The same machine runs again with ``send_ahead`` (what the daemon uses): a busy process-mode
worker may hold one request sent ahead besides the one it runs, and then also

9. a request is sent ahead only to a busy process-mode worker that holds no other, it is
   not in flight (no slot, no cap) until the one before it finishes, and when its worker
   dies or times out first it is dispatched again (or answered), never lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

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

FUNCTIONS = ("a", "b", "c")
TENANT_OF = {"a": "t1", "b": "t1", "c": "t2"}
VERSIONS = ("v1", "v2", "v3")


@st.composite
def function_limits(draw: st.DrawFn) -> FunctionLimits:
    max_workers = draw(st.integers(1, 3))
    rate = draw(st.sampled_from([None, None, None, None, 2.0, 10.0]))
    return FunctionLimits(
        max_workers=max_workers,
        concurrency=draw(st.sampled_from([1, 1, 2])),
        max_inflight=draw(st.sampled_from([None, None, 1, 2, 4])),
        queue_max=draw(st.sampled_from([0, 3, 8, 8])),
        queue_timeout=draw(st.sampled_from([1.0, 5.0])),
        timeout=draw(st.sampled_from([1.0, 3.0, 7.0])),
        keep_alive=draw(st.sampled_from([0.0, 2.0, 10.0])),
        spares=draw(st.integers(0, min(1, max_workers))),
        max_requests=draw(st.sampled_from([0, 0, 2])),
        max_worker_memory=draw(st.sampled_from([None, 100])),
        rate=rate,
        burst=draw(st.sampled_from([None, 2])) if rate is not None else None,
    )


tenant_limits = st.builds(
    TenantLimits,
    max_inflight=st.sampled_from([None, 1, 2, 3]),
    rate=st.sampled_from([None, None, 5.0]),
)


@dataclass
class ModelRequest:
    fn: str
    submitted: float
    status: str = "waiting"  # waiting, ahead, running, done
    worker: int | None = None
    deadline: float = 0.0  # invocation timeout, once running


@dataclass
class ModelWorker:
    fn: str
    version: str
    slots: int
    ready: bool = False
    doomed: bool = False  # its snapshot was lost: the shell will report it dead
    uses: int = 0
    answered: bool = False
    running: set[int] = field(default_factory=set)
    ahead: int | None = None  # sent ahead, to start when the running one ends


class SchedulerMachine(RuleBasedStateMachine):
    send_ahead = False

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.s = Scheduler(lambda: self.now)
        self.requests: dict[int, ModelRequest] = {}
        self.workers: dict[int, ModelWorker] = {}
        self.seen_workers: set[int] = set()
        self.killed: list[int] = []
        self.snapshots: dict[tuple[str, str], str] = {}  # building, ready
        self.limits: dict[str, FunctionLimits] = {}
        self.tenant_caps: dict[str, int | None] = {"t1": None, "t2": None}
        self.next_rid = 1
        self.max_host: int | None = None
        # Functions whose event being applied is a failure to start, the only kind that
        # may put a function into backoff.
        self.start_crash: set[str] = set()

    @initialize(
        max_host=st.sampled_from([None, 2, 4]),
        threshold=st.sampled_from([1, 2, 3, 3]),
        limits=st.tuples(function_limits(), function_limits(), function_limits()),
        ready=st.lists(st.sampled_from([True, True, True, False]), min_size=3, max_size=3),
    )
    def setup(
        self,
        max_host: int | None,
        threshold: int,
        limits: tuple[FunctionLimits, ...],
        ready: list[bool],
    ) -> None:
        """Most schedules start with the functions deployed, most of them serving."""
        self.max_host = max_host
        self.s = Scheduler(
            lambda: self.now,
            max_host_workers=max_host,
            crash_loop_threshold=threshold,
            backoff_initial=1.0,
            backoff_max=4.0,
            send_ahead=self.send_ahead,
        )
        for fn, lim, ok in zip(FUNCTIONS, limits, ready, strict=True):
            self.limits[fn] = lim
            self.apply(self.s.deploy(fn, "v1", TENANT_OF[fn], lim))
            if ok:
                self.snapshots[(fn, "v1")] = "ready"
                self.apply(self.s.snapshot_ready(fn, "v1"))

    # ------------------------------------------------------------------ the shell

    def apply(self, decisions: list[Decision]) -> None:
        self._apply(decisions)
        for fn in {self.requests[d.request_id].fn for d in decisions if isinstance(d, Dispatch)}:
            if self.s.stats(fn)["state"] == "trial":
                assert self._running(fn) <= 1, f"{fn}: more than one request on trial"

    def _apply(self, decisions: list[Decision]) -> None:
        for d in decisions:
            if isinstance(d, Dispatch):
                self._dispatch(d)
            elif isinstance(d, Reject):
                req = self.requests[d.request_id]
                assert req.status == "waiting", f"{d} for a request that is {req.status}"
                assert d.status in (404, 429, 503) and d.reason
                assert d.retry_after is None or d.retry_after > 0
                req.status = "done"
            elif isinstance(d, Fail):
                req = self.requests[d.request_id]
                assert req.status in ("running", "ahead"), f"{d} for a request that is {req.status}"
                assert d.status in (502, 503, 504) and d.reason
                assert req.worker is not None
                if req.worker in self.workers:  # not when the worker's own death is the news
                    w = self.workers[req.worker]
                    w.running.discard(d.request_id)
                    if w.ahead == d.request_id:
                        # 503: it waited too long; 502: its worker timed out on the one
                        # before it, and it may have started (never run twice)
                        assert d.status in (502, 503), f"{d} for a request sent ahead"
                        w.ahead = None
                req.status = "done"
            elif isinstance(d, Fork):
                assert d.worker_id not in self.seen_workers, f"{d} reuses a worker id"
                assert self.snapshots.get((d.function, d.version)) == "ready", (
                    f"{d} from a snapshot that is {self.snapshots.get((d.function, d.version))}"
                )
                self.seen_workers.add(d.worker_id)
                self.workers[d.worker_id] = ModelWorker(
                    d.function, d.version, self.limits[d.function].concurrency
                )
            elif isinstance(d, Kill):
                w = self.workers.pop(d.worker_id, None)
                assert w is not None, f"{d} names an unknown worker"
                assert not w.running, f"{d} while it holds unanswered requests {w.running}"
                # What was sent ahead to a worker killed for a timeout was failed first.
                assert w.ahead is None, f"{d} while it holds {w.ahead} sent ahead"
                self.killed.append(d.worker_id)
            elif isinstance(d, BuildSnapshot):
                key = (d.function, d.version)
                assert key not in self.snapshots, f"{d} while that snapshot lives"
                self.snapshots[key] = "building"
            elif isinstance(d, DropSnapshot):
                key = (d.function, d.version)
                assert key in self.snapshots, f"{d} for a snapshot the shell does not have"
                left = [
                    wid
                    for wid, w in self.workers.items()
                    if (w.fn, w.version) == key and not w.doomed
                ]
                assert not left, f"{d} while workers {left} of it live"
                del self.snapshots[key]
            else:
                assert isinstance(d, FunctionState)
                if d.state == "backoff":
                    assert d.function in self.start_crash, f"{d} after no failure to start"

    def _unsend(self, w: ModelWorker) -> None:
        assert w.ahead is not None
        req = self.requests[w.ahead]
        assert req.status == "ahead"
        req.status = "waiting"
        req.worker = None
        w.ahead = None

    def _dispatch(self, d: Dispatch) -> None:
        req = self.requests[d.request_id]
        assert req.status == "waiting", f"{d} for a request that is {req.status}"
        w = self.workers.get(d.worker_id)
        assert w is not None, f"{d} to an unknown worker"
        assert w.ready and not w.doomed, f"{d} to a worker that is not ready"
        assert w.fn == req.fn, f"{d}: worker of {w.fn}, request for {req.fn}"
        if d.ahead:
            assert self.send_ahead, f"{d} from a scheduler that does not send ahead"
            assert w.slots == 1 and len(w.running) == 1, f"{d} to a worker not busy with one"
            assert w.ahead is None, f"{d} to a worker already holding {w.ahead}"
            oldest = min(
                r for r, q in self.requests.items() if q.fn == req.fn and q.status == "waiting"
            )
            assert d.request_id == oldest, f"{d} ahead of request {oldest} (not FIFO)"
            req.status = "ahead"
            req.worker = d.worker_id
            w.ahead = d.request_id
            return
        assert len(w.running) < w.slots, f"{d} to a worker with no free slot"
        assert w.ahead is None, f"{d} to a worker holding {w.ahead} sent ahead"
        if d.start in ("spare", "fork") and w.slots == 1:
            assert w.uses == 0, f"{d}: start {d.start} on a worker used before"
        oldest = min(
            r for r, q in self.requests.items() if q.fn == req.fn and q.status == "waiting"
        )
        assert d.request_id == oldest, f"{d} ahead of request {oldest} (not FIFO)"
        req.status = "running"
        req.worker = d.worker_id
        req.deadline = self.now + self.limits[req.fn].timeout
        w.running.add(d.request_id)
        w.uses += 1
        lim = self.limits[req.fn]
        assert self._running(req.fn) <= lim.inflight_cap, f"{d} over max_inflight"
        tenant = TENANT_OF[req.fn]
        cap = self.tenant_caps[tenant]
        assert cap is None or self._tenant_running(tenant) <= cap, f"{d} over the tenant cap"

    def _running(self, fn: str) -> int:
        return sum(1 for q in self.requests.values() if q.fn == fn and q.status == "running")

    def _tenant_running(self, tenant: str) -> int:
        return sum(self._running(fn) for fn in FUNCTIONS if TENANT_OF[fn] == tenant)

    def _pending_forks(self) -> list[int]:
        return sorted(w for w, mw in self.workers.items() if not mw.ready and not mw.doomed)

    def _running_requests(self) -> list[int]:
        return sorted(r for r, q in self.requests.items() if q.status == "running")

    # ------------------------------------------------------------------ configuration

    @rule(fn=st.sampled_from(FUNCTIONS), version=st.sampled_from(VERSIONS), data=st.data())
    def deploy(self, fn: str, version: str, data: st.DataObject) -> None:
        if fn not in self.limits:
            self.limits[fn] = data.draw(function_limits())
        self.apply(self.s.deploy(fn, version, TENANT_OF[fn], self.limits[fn]))

    @rule(fn=st.sampled_from(FUNCTIONS), data=st.data())
    def relimit(self, fn: str, data: st.DataObject) -> None:
        """Redeploy the current version with new timeouts, queue and spares (the limits
        whose change must not break a cap that the model checks)."""
        if fn not in self.s.functions():
            return
        old = self.limits[fn]
        new = FunctionLimits(
            max_workers=old.max_workers,
            concurrency=old.concurrency,
            max_inflight=old.max_inflight,
            queue_max=data.draw(st.integers(0, 4)),
            queue_timeout=data.draw(st.sampled_from([0.5, 1.0, 5.0])),
            timeout=data.draw(st.sampled_from([0.5, 3.0])),
            keep_alive=data.draw(st.sampled_from([0.0, 1.0, 10.0])),
            spares=data.draw(st.integers(0, min(1, old.max_workers))),
        )
        self.limits[fn] = new
        version = self.s.stats(fn)["version"]
        self.apply(self.s.deploy(fn, version, TENANT_OF[fn], new))

    @rule(tenant=st.sampled_from(["t1", "t2"]), limits=tenant_limits)
    def set_tenant_limits(self, tenant: str, limits: TenantLimits) -> None:
        self.tenant_caps[tenant] = limits.max_inflight
        self.apply(self.s.set_tenant_limits(tenant, limits))

    @rule(fn=st.sampled_from(FUNCTIONS), really=st.integers(0, 3))
    def remove(self, fn: str, really: int) -> None:
        if really:  # removals end a lot of interesting schedules; keep them rare
            return
        self.apply(self.s.remove(fn))
        assert fn not in self.s.functions()
        assert not any(q.fn == fn and q.status != "done" for q in self.requests.values())
        left = [w for w, mw in self.workers.items() if mw.fn == fn]
        assert not left, f"workers {left} of {fn} outlive its removal"
        kept = [k for k in self.snapshots if k[0] == fn]
        assert not kept, f"snapshots {kept} outlive the removal"

    # ------------------------------------------------------------------ requests

    @rule(fn=st.sampled_from([*FUNCTIONS, *FUNCTIONS, "nope"]), n=st.integers(1, 4))
    def submit(self, fn: str, n: int) -> None:
        for _ in range(n):
            rid = self.next_rid
            self.next_rid += 1
            self.requests[rid] = ModelRequest(fn, self.now)
            self.apply(self.s.submit(rid, fn))

    @precondition(lambda self: any(q.status != "done" for q in self.requests.values()))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        rid = data.draw(
            st.sampled_from(sorted(r for r, q in self.requests.items() if q.status != "done"))
        )
        was = self.requests[rid].status
        self.apply(self.s.cancel(rid))
        if was == "waiting":
            self.requests[rid].status = "done"

    @precondition(lambda self: any(q.status == "running" for q in self.requests.values()))
    @rule(data=st.data(), n=st.integers(1, 3))
    def finish(self, data: st.DataObject, n: int) -> None:
        for _ in range(n):
            running = self._running_requests()
            if not running:
                return
            self._finish(data.draw(st.sampled_from(running)))

    def _finish(self, rid: int) -> None:
        req = self.requests[rid]
        assert req.worker is not None
        w = self.workers[req.worker]
        w.running.discard(rid)
        w.answered = True
        req.status = "done"
        if w.ahead is not None:
            # The worker reads the one sent ahead as it answers: it runs from now.
            nxt = self.requests[w.ahead]
            nxt.status = "running"
            nxt.deadline = self.now + self.limits[nxt.fn].timeout
            w.running.add(w.ahead)
            w.uses += 1
            w.ahead = None
        self.apply(self.s.finished(req.worker, rid))

    @rule(data=st.data(), submits=st.integers(0, 6), steps=st.integers(1, 8))
    def busy_period(self, data: st.DataObject, submits: int, steps: int) -> None:
        """Ordinary traffic: requests arrive, forks come up, invocations finish, in a random
        interleaving, with time passing a little."""
        fn_choice = st.sampled_from(FUNCTIONS)
        for _ in range(submits):
            self.submit(data.draw(fn_choice), 1)
        for _ in range(steps):
            what = data.draw(st.sampled_from(["fork", "finish", "finish", "submit", "time"]))
            pending = self._pending_forks()
            running = self._running_requests()
            if what == "fork" and pending:
                wid = data.draw(st.sampled_from(pending))
                self.workers[wid].ready = True
                self.apply(self.s.worker_ready(wid))
            elif what == "finish" and running:
                self._finish(data.draw(st.sampled_from(running)))
            elif what == "submit":
                self.submit(data.draw(fn_choice), 1)
            elif what == "time":
                self.advance(0.1)

    # ------------------------------------------------------------------ snapshots

    @precondition(lambda self: "building" in self.snapshots.values())
    @rule(data=st.data(), ok=st.sampled_from([True, True, True, False]))
    def snapshot_built(self, data: st.DataObject, ok: bool) -> None:
        key = data.draw(
            st.sampled_from(sorted(k for k, v in self.snapshots.items() if v == "building"))
        )
        if ok:
            self.snapshots[key] = "ready"
            self.apply(self.s.snapshot_ready(*key))
        else:
            del self.snapshots[key]
            self.start_crash = {key[0]}
            self.apply(self.s.snapshot_failed(*key, "ImportError: no module named x"))
            self.start_crash = set()

    @precondition(lambda self: "ready" in self.snapshots.values())
    @rule(data=st.data(), really=st.integers(0, 2))
    def snapshot_lost(self, data: st.DataObject, really: int) -> None:
        if really:
            return
        key = data.draw(
            st.sampled_from(sorted(k for k, v in self.snapshots.items() if v == "ready"))
        )
        del self.snapshots[key]
        for w in self.workers.values():
            if (w.fn, w.version) == key:
                w.doomed = True
        self.apply(self.s.snapshot_lost(*key, "killed by signal 9"))

    @precondition(lambda self: any(w.doomed for w in self.workers.values()))
    @rule(data=st.data())
    def report_doomed(self, data: st.DataObject) -> None:
        wid = data.draw(st.sampled_from(sorted(w for w, mw in self.workers.items() if mw.doomed)))
        self._died(wid)

    # ------------------------------------------------------------------ workers

    @precondition(lambda self: bool(self._pending_forks()))
    @rule(data=st.data(), n=st.integers(1, 3))
    def forks_resolved(self, data: st.DataObject, n: int) -> None:
        for _ in range(n):
            pending = self._pending_forks()
            if not pending:
                return
            wid = data.draw(st.sampled_from(pending))
            if data.draw(st.sampled_from([True, True, True, False])):
                self.workers[wid].ready = True
                self.apply(self.s.worker_ready(wid))
            else:
                fn = self.workers.pop(wid).fn
                self.start_crash = {fn}
                self.apply(self.s.fork_failed(wid, "fork: out of memory"))
                self.start_crash = set()

    @precondition(lambda self: bool(self.workers))
    @rule(data=st.data(), really=st.integers(0, 1), oom=st.booleans())
    def worker_died(self, data: st.DataObject, really: int, oom: bool) -> None:
        if really:
            return
        self._died(data.draw(st.sampled_from(sorted(self.workers))), oom)

    def _died(self, wid: int, oom: bool = False) -> None:
        w = self.workers.pop(wid)
        if w.ahead is not None:
            self._unsend(w)  # it never started there: the scheduler dispatches it again
        if not w.answered and not oom:
            self.start_crash = {w.fn}
        if oom:
            self.apply(self.s.worker_died(wid, "killed by the kernel's OOM killer", oom=True))
        else:
            self.apply(self.s.worker_died(wid, "exit status 1"))
        self.start_crash = set()
        unanswered = [r for r in w.running if self.requests[r].status != "done"]
        assert not unanswered, f"worker {wid} died and requests {unanswered} got no answer"

    @precondition(lambda self: bool(self.killed))
    @rule(data=st.data())
    def late_news_of_killed_worker(self, data: st.DataObject) -> None:
        """Events racing with a Kill (the worker's own exit, a late result) are ignored."""
        wid = data.draw(st.sampled_from(self.killed))
        assert self.s.worker_died(wid, "killed") == []
        assert self.s.worker_ready(wid) == []
        assert self.s.finished(wid, 1) == []

    @precondition(lambda self: bool(self.workers))
    @rule(data=st.data(), rss=st.sampled_from([50, 150]))
    def memory(self, data: st.DataObject, rss: int) -> None:
        self.apply(self.s.worker_memory(data.draw(st.sampled_from(sorted(self.workers))), rss))

    @rule(
        fn=st.sampled_from(FUNCTIONS),
        what=st.sampled_from(["unload", "prewarm", "evict", "none", "none"]),
    )
    def memory_policy(self, fn: str, what: str) -> None:
        if what == "unload":
            out = self.s.unload(fn)
            self.apply(out)
            for d in out:
                if isinstance(d, DropSnapshot):
                    assert (d.function, d.version) not in self.snapshots
        elif what == "prewarm":
            self.apply(self.s.prewarm(fn))
        elif what == "evict":
            self.apply(self.s.evict_idle(fn, 1))

    # ------------------------------------------------------------------ time

    @rule(dt=st.sampled_from([0.1, 0.5, 1.0, 3.0]))
    def advance(self, dt: float) -> None:
        deadline = self.s.next_deadline()
        self.now += dt
        out = self.s.tick()
        if deadline is None or self.now < deadline:
            assert out == [], f"tick at {self.now} acted before next_deadline {deadline}: {out}"
        self.apply(out)

    @rule()
    def advance_to_deadline(self) -> None:
        deadline = self.s.next_deadline()
        if deadline is None:
            return
        self.now = max(self.now, deadline)
        self.apply(self.s.tick())

    # ------------------------------------------------------------------ invariants

    @invariant()
    def workers_within_limits(self) -> None:
        for fn in self.s.functions():
            mine = [w for w in self.workers.values() if w.fn == fn and not w.doomed]
            stats = self.s.stats(fn)
            assert len(mine) <= self.limits[fn].max_workers, f"{fn} has {len(mine)} workers"
            # Doomed workers may already be forgotten by the scheduler (killed as lost).
            doomed = [w for w in self.workers.values() if w.fn == fn and w.doomed]
            counted = sum(stats["workers"].values())
            assert len(mine) <= counted <= len(mine) + len(doomed), (fn, stats["workers"])
            assert counted <= self.limits[fn].max_workers
        if self.max_host is not None:
            assert self.s.host_stats()["workers"] <= self.max_host

    @invariant()
    def queue_and_inflight_agree(self) -> None:
        for fn in self.s.functions():
            stats = self.s.stats(fn)
            waiting = sum(1 for q in self.requests.values() if q.fn == fn and q.status == "waiting")
            assert stats["queued"] == waiting, (fn, stats["queued"], waiting)
            assert stats["inflight"] == self._running(fn)

    @invariant()
    def sent_ahead_counts_agree(self) -> None:
        """The count that lets a busy function skip the search for a worker to send ahead
        to matches the workers that hold one (a wrong count sends none, or walks for none)."""
        for f in self.s._functions.values():
            holding = sum(1 for w in f.workers.values() if w.ahead is not None)
            assert f.aheads == holding, (f.name, f.aheads, holding)

    @invariant()
    def refused_functions_hold_no_queue(self) -> None:
        for fn in self.s.functions():
            stats = self.s.stats(fn)
            if stats["state"] in ("backoff", "failed"):
                assert stats["queued"] == 0, stats

    @invariant()
    def next_deadline_covers_timeouts(self) -> None:
        """Every queue timeout and invocation timeout is at or after next_deadline()."""
        due = [
            q.submitted + self.limits[q.fn].queue_timeout
            for q in self.requests.values()
            if q.status == "waiting" and q.fn in self.s.functions()
        ]
        due += [q.deadline for q in self.requests.values() if q.status == "running"]
        if due:
            deadline = self.s.next_deadline()
            assert deadline is not None and deadline <= min(due) + 1e-9, (deadline, min(due))

    @invariant()
    def queue_moves_when_it_can(self) -> None:
        for fn in self.s.functions():
            stats = self.s.stats(fn)
            if not stats["queued"] or stats["state"] not in ("serving", "trial"):
                continue
            lim = self.limits[fn]
            cap = 1 if stats["state"] == "trial" else lim.inflight_cap
            tcap = self.tenant_caps[TENANT_OF[fn]]
            if stats["inflight"] >= cap:
                continue
            if tcap is not None and self._tenant_running(TENANT_OF[fn]) >= tcap:
                continue
            assert stats["free_slots"] == 0, f"{fn}: queue waits beside free workers: {stats}"
            if stats["snapshot"] != "ready":
                assert stats["snapshot"] == "building" or stats["pending_version"], stats
                continue
            host_full = (
                self.max_host is not None and self.s.host_stats()["workers"] >= self.max_host
            )
            total = sum(stats["workers"].values())
            assert stats["workers"]["starting"] or total >= lim.max_workers or host_full, (
                f"{fn}: queue stuck with room to fork: {stats}"
            )
            if host_full and not stats["workers"]["starting"] and total < lim.max_workers:
                # Stuck on a full host: nothing may be left to evict for it.
                for other in self.s.functions():
                    o = self.s.stats(other)
                    if other != fn and not o["queued"]:
                        assert o["workers"]["idle"] + o["workers"]["spare"] == 0, (fn, o)

    def teardown(self) -> None:
        """Drain: build, fork and finish everything, let all timers run; then nothing may
        be left unanswered."""
        for _ in range(100):
            if all(q.status == "done" for q in self.requests.values()):
                break
            for key in [k for k, v in self.snapshots.items() if v == "building"]:
                if self.snapshots.get(key) == "building":
                    self.snapshots[key] = "ready"
                    self.apply(self.s.snapshot_ready(*key))
            for wid in [w for w, mw in self.workers.items() if mw.doomed]:
                if wid in self.workers:
                    self._died(wid)
            for wid in self._pending_forks():
                if wid in self.workers and not self.workers[wid].ready:
                    self.workers[wid].ready = True
                    self.apply(self.s.worker_ready(wid))
            for rid in self._running_requests():
                if self.requests[rid].status == "running":
                    self._finish(rid)
            self.now += 100.0
            self.apply(self.s.tick())
        left = {r: q for r, q in self.requests.items() if q.status != "done"}
        assert not left, f"unanswered after draining: {left}"


SchedulerMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSchedulerStateful = SchedulerMachine.TestCase


class SchedulerAheadMachine(SchedulerMachine):
    send_ahead = True


SchedulerAheadMachine.TestCase.settings = SchedulerMachine.TestCase.settings
TestSchedulerAheadStateful = SchedulerAheadMachine.TestCase
