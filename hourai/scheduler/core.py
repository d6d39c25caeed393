"""The scheduler core: events in, decisions out.

Sans-I/O in the manner of h11. The daemon owns the sockets and the processes; this object
owns every scheduling choice. It never performs I/O and never reads a clock other than the
injected ``clock()``, so the daemon, the trace simulator in bench/ and hypothesis all drive
the very same code. Every event method returns the decisions the caller must carry out, in
order (a Dispatch always comes before the Fork that refills the spare it used, so the
invocation is on its way before the fork starts).

A worker's life, all of it in the "worker transitions" section below::

    starting ──ready──> spare ─────dispatch─────> busy <──finish/dispatch──> idle
        └──ready, work queued──────────────────> busy
    busy ──finish, with one sent ahead──> busy
    busy ──new version / snapshot lost──> draining ──last finish──> dead
    any ──kill (idle, timeout, recycle, ...) or died──> dead

In thread mode (concurrency > 1) "busy" means at least one invocation in flight and "idle"
none; a busy worker with a free slot still takes work.

Sending ahead (``Scheduler(send_ahead=True)``, what the daemon uses): a busy process-mode
worker of a fast function may be dispatched the next queued request before its current one
ends (``Dispatch(ahead=True)``), so the invocation is already in its channel when it looks
for the next and it never sleeps in between. It still runs one at a time: the request sent
ahead is not in flight (no slot, no cap, no timeout) until the one before it finishes, and
only then does its invocation timeout start. If the worker dies or times out first, the
request it had not started goes back to the head of the queue and is dispatched again.

Time: invocation timeouts, queue timeouts, idle reaping and backoff expiry share one heap.
An entry is only a promise to look at its owner (a worker or a function) again at that time;
the owner keeps the time of its earliest live entry in ``armed``, and a new entry is pushed
only when something falls due earlier than that. A worker reused thousands of times thus
holds one or two entries, not one per invocation, and the request path pushes to the heap
about once per keep-alive period per worker.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from hourai.scheduler.limits import FunctionLimits, TenantLimits, TokenBucket

__all__ = [
    "BuildSnapshot",
    "Decision",
    "Dispatch",
    "DropSnapshot",
    "Fail",
    "Fork",
    "FunctionLimits",
    "FunctionState",
    "Kill",
    "Reject",
    "Scheduler",
    "StartPath",
    "TenantLimits",
]

StartPath = Literal["warm", "spare", "fork", "cold"]


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Send the request to that worker. ``start`` is how the worker was come by: an idle
    worker (warm), a pre-forked one (spare), a fork for this demand (fork), or the request
    arrived while the function had no ready snapshot (cold). ``ahead``: the worker is busy
    and runs it after its current invocation (see the module docstring)."""

    request_id: int
    worker_id: int
    start: StartPath
    ahead: bool = False


@dataclass(frozen=True, slots=True)
class Reject:
    """Answer the request without a worker (429 rate limit, 503 overload or unavailable,
    404 unknown function). ``reason`` is the HTTP body; ``retry_after`` in seconds."""

    request_id: int
    status: int
    reason: str
    retry_after: float | None


@dataclass(frozen=True, slots=True)
class Fail:
    """Answer a request that a worker held and will never answer (502 died, 504 timeout,
    503 function removed)."""

    request_id: int
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class BuildSnapshot:
    """Make the snapshot of that version; answer with snapshot_ready or snapshot_failed."""

    function: str
    version: str


@dataclass(frozen=True, slots=True)
class DropSnapshot:
    """Stop that snapshot: it has no workers left and no longer serves."""

    function: str
    version: str


@dataclass(frozen=True, slots=True)
class Fork:
    """Fork a worker from that snapshot under this id; answer with worker_ready or
    fork_failed (or worker_died). ``spare``: it is forked ahead of demand, to wait for a
    request (it may still take a queued one when ready)."""

    function: str
    version: str
    worker_id: int
    spare: bool = False


@dataclass(frozen=True, slots=True)
class Kill:
    """Stop that worker. It may be one whose Fork is still in flight, or one that has just
    died on its own; after a Kill the scheduler ignores every event about it."""

    worker_id: int
    reason: str  # idle, timeout, recycle, memory, drained, removed, evicted, lost


@dataclass(frozen=True, slots=True)
class FunctionState:
    """A change worth a log line: serving, backoff, failed, removed."""

    function: str
    state: str
    detail: str


Decision: TypeAlias = (
    Dispatch | Reject | Fail | BuildSnapshot | DropSnapshot | Fork | Kill | FunctionState
)

# Worker states.
STARTING = "starting"
SPARE = "spare"
IDLE = "idle"
BUSY = "busy"
DRAINING = "draining"
DEAD = "dead"
_COUNTED_STATES = (STARTING, SPARE, IDLE, BUSY, DRAINING)

# Function states.
BUILDING = "building"  # first snapshot of this version on its way; requests queue
SERVING = "serving"
TRIAL = "trial"  # backoff over: one request at a time until one succeeds
BACKOFF = "backoff"  # crash-looping: requests refused until backoff_until
FAILED = "failed"  # the version could not be built; refused until a redeploy

# States of the snapshot of the function's current version.
SNAP_BUILDING = "building"
SNAP_READY = "ready"
SNAP_ABSENT = "absent"  # lost after serving; rebuilt when a request needs it
SNAP_FAILED = "failed"

# Request states.
_QUEUED = 0
_RUNNING = 1
_DONE = 2
_AHEAD = 3  # sent to a busy worker, which starts it when its current invocation ends

# Send ahead only for a function whose invocations have lately taken at most this long
# (a moving average), and only to a worker whose current one has not run longer: then the
# request waits microseconds behind it, and the worker saves a sleep and a wake-up (about
# 50 µs here). A slower function gains nothing from it, and a request committed to one
# worker could wait behind a long invocation while another worker frees up.
AHEAD_MAX_SERVICE = 0.005
_SERVICE_WEIGHT = 0.3  # of the newest invocation in the moving average

# Retry-After for overload (queue full, queue timeout): soon enough to ride out a burst,
# late enough that clients retrying in a loop do not become the overload.
OVERLOAD_RETRY_AFTER = 1.0


# --------------------------------------------------------------------------- records


class _Tenant:
    __slots__ = ("blocked", "bucket", "cap", "inflight", "limits", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.limits = TenantLimits()
        self.cap: int | None = None
        self.bucket: TokenBucket | None = None
        self.inflight = 0
        # Functions with queued requests held back only by this tenant's in-flight cap,
        # oldest first; served in turn when the tenant's capacity comes back.
        self.blocked: dict[str, _Function] = {}


class _Request:
    __slots__ = (
        "cold",
        "deadline",
        "enqueued",
        "fn",
        "id",
        "own_timeout",
        "seq",
        "state",
        "tenant",
        "timeout",
    )

    def __init__(self, rid: int, seq: int, fn: _Function, now: float, cold: bool) -> None:
        self.id = rid
        self.seq = seq  # arrival order: the queue is kept in it
        self.fn = fn
        self.enqueued = now
        self.cold = cold
        self.state = _QUEUED
        self.deadline = 0.0
        self.timeout = 0.0
        self.own_timeout: float | None = None  # an async invocation's, instead of the function's
        # The tenant charged for it while running (a redeploy may move the function).
        self.tenant: _Tenant | None = None


class _Worker:
    __slots__ = (
        "ahead",
        "answered",
        "armed",
        "fn",
        "id",
        "idle_since",
        "inflight",
        "lost",
        "recycle",
        "requests",
        "retired",
        "rss",
        "slots",
        "state",
        "uses",
        "version",
    )

    def __init__(self, wid: int, fn: _Function, version: str, slots: int) -> None:
        self.id = wid
        self.fn = fn
        self.version = version
        self.slots = slots  # concurrency when forked: the worker's thread pool is fixed then
        self.state = STARTING
        self.inflight = 0
        # In flight, and the one sent ahead (which is not counted in inflight).
        self.requests: dict[int, _Request] = {}
        self.ahead: _Request | None = None
        self.uses = 0
        self.idle_since = 0.0
        self.recycle: str | None = None  # Kill reason once it has nothing in flight
        self.retired = False  # an old version's worker: never gets new work
        self.lost = False  # its snapshot died: its own death is expected, not a crash
        self.rss: int | None = None
        self.armed: float | None = None
        # It has answered an invocation: the function starts, so its death is one
        # invocation's failure, not a crash loop.
        self.answered = False


class _Function:
    __slots__ = (
        "aheads",
        "armed",
        "backoff",
        "backoff_until",
        "bucket",
        "cap",
        "counters",
        "counts",
        "crashes",
        "ever_ready",
        "free",
        "inflight",
        "kills",
        "last_error",
        "limits",
        "live",
        "name",
        "pending",
        "per_version",
        "queue",
        "queued",
        "rejected",
        "service",
        "snap",
        "spare",
        "starting",
        "starts",
        "state",
        "tenant",
        "version",
        "workers",
    )

    def __init__(
        self, name: str, version: str, tenant: _Tenant, limits: FunctionLimits, backoff: float
    ) -> None:
        self.name = name
        self.tenant = tenant
        self.limits = limits
        self.cap = limits.inflight_cap
        self.bucket: TokenBucket | None = None
        self.version = version  # the version requests go to
        self.pending: str | None = None  # a newer version being built; becomes current when ready
        self.snap = SNAP_BUILDING
        self.ever_ready = False  # whether the current version has served (so a loss is no refusal)
        self.live: set[str] = {version}  # versions with a snapshot process we must drop one day
        # Workers per version whose snapshot is alive (not lost), for DropSnapshot.
        self.per_version: dict[str, int] = {}
        self.workers: dict[int, _Worker] = {}
        # Ready workers of the current version with a free slot, most recently used last.
        self.free: OrderedDict[int, _Worker] = OrderedDict()
        self.spare: dict[int, _Worker] = {}
        self.starting = 0  # current-version workers being forked (future capacity)
        self.counts = dict.fromkeys(_COUNTED_STATES, 0)
        # FIFO; a cancelled request stays in place, marked done, until it reaches the head.
        self.queue: deque[_Request] = deque()
        self.queued = 0  # live requests in the queue
        self.inflight = 0
        self.aheads = 0  # workers holding a request sent ahead
        self.state = BUILDING
        self.crashes = 0  # consecutive start crashes (see _crashed) since the function last ran
        self.backoff = backoff  # length of the current (or next) backoff
        self.backoff_until = 0.0
        self.last_error: str | None = None
        self.armed: float | None = None
        # Moving average of invocation times (seconds); inf until one has finished.
        self.service = math.inf
        self.starts = dict.fromkeys(("warm", "spare", "fork", "cold"), 0)
        self.rejected: dict[str, int] = {}
        self.kills: dict[str, int] = {}
        self.counters = dict.fromkeys(
            ("completed", "died", "oom_kills", "timeouts", "forks", "fork_failures", "cancelled"),
            0,
        )


_TimerOwner: TypeAlias = _Worker | _Function


# --------------------------------------------------------------------------- scheduler


class Scheduler:
    """Pools, queues, dispatch, limits and health of every function on the host.

    ``clock`` is the only source of time (the daemon passes ``loop.time``; a simulator its
    own). ``max_host_workers`` caps workers over all functions; when the host is full, a
    request that needs a fork evicts the least recently used idle worker (then a spare) of
    another function.

    Only crashes back off: a function that fails to start ``crash_loop_threshold`` times in
    a row (a fork that fails, a worker that dies before it has answered an invocation, a
    snapshot rebuild that fails) is refused for ``backoff_initial`` seconds, doubling up to
    ``backoff_max`` while it keeps failing. What goes wrong inside one invocation of a
    function that starts (a timeout, an exception, an OOM kill, the death of a worker that
    has served) is that request's answer (504, 500, 502) and never refuses the next one.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        max_host_workers: int | None = None,
        crash_loop_threshold: int = 3,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        send_ahead: bool = False,
    ) -> None:
        if max_host_workers is not None and max_host_workers < 1:
            raise ValueError(f"max_host_workers must be at least 1, got {max_host_workers}")
        if crash_loop_threshold < 1:
            raise ValueError(f"crash_loop_threshold must be at least 1, got {crash_loop_threshold}")
        if not 0 < backoff_initial <= backoff_max:
            raise ValueError("backoff needs 0 < backoff_initial <= backoff_max")
        self._clock = clock
        self.max_host_workers = max_host_workers
        self.crash_loop_threshold = crash_loop_threshold
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.send_ahead = send_ahead
        self._arrivals = 0
        self._functions: dict[str, _Function] = {}
        self._tenants: dict[str, _Tenant] = {}
        self._workers: dict[int, _Worker] = {}
        self._requests: dict[int, _Request] = {}
        # Host-wide eviction candidates: idle workers least recently idle first, and spares.
        self._idle: OrderedDict[int, _Worker] = OrderedDict()
        self._spares: dict[int, _Worker] = {}
        # Functions short of forks because the host is full: for queued requests (served
        # first, may evict) and for spares (only into free room).
        self._starved: dict[str, _Function] = {}
        self._starved_spares: dict[str, _Function] = {}
        self._timers: list[tuple[float, int, _TimerOwner]] = []
        # Entries pushed so far: without a push, next_deadline() can only move later, so a
        # shell whose timer is armed need not ask again (it asks after every event).
        self.timer_pushes = 0
        self._seq = itertools.count()
        self._next_wid = 1

    # ----------------------------------------------------------------- configuration

    def deploy(
        self, function: str, version: str, tenant: str, limits: FunctionLimits
    ) -> list[Decision]:
        """Make ``version`` the one that serves ``function``.

        A new function: BuildSnapshot, and requests queue (cold) until it is ready. A new
        version of a serving function: BuildSnapshot, and the old version serves until the
        new one is ready. The same version again: the limits are updated (and a failed build
        is retried); a newer version still building is abandoned.
        """
        now = self._clock()
        out: list[Decision] = []
        t = self._tenant(tenant)
        f = self._functions.get(function)
        if f is None:
            f = _Function(function, version, t, limits, self.backoff_initial)
            f.bucket = TokenBucket.create(limits.rate, limits.burst, now)
            self._functions[function] = f
            out.append(BuildSnapshot(function, version))
            return out
        if f.tenant is not t:
            f.tenant.blocked.pop(function, None)
            f.tenant = t
        self._apply_limits(f, limits, now, out)
        if version == f.version:
            if f.pending is not None:
                self._drop_pending(f, out)
            if f.snap == SNAP_FAILED:
                self._build_version(f, out, fresh=True)
        elif version == f.pending:
            pass
        elif version in f.live:
            # A rollback to a version still draining: its snapshot is ready, use it now.
            if f.pending is not None:
                self._drop_pending(f, out)
            self._switch(f, version, out)
        elif f.snap == SNAP_READY:
            if f.pending is not None:
                self._drop_pending(f, out)
            f.pending = version
            f.live.add(version)
            out.append(BuildSnapshot(function, version))
        else:
            # Nothing is serving (first build, failed, or snapshot lost): no reason to wait
            # for the old version, the new one simply takes its place.
            if f.pending is not None:
                self._drop_pending(f, out)
            old = f.version
            f.version = version
            for w in list(f.workers.values()):
                if w.version == old:
                    self._retire_old(w, out)
            self._maybe_drop(f, old, out)
            self._build_version(f, out, fresh=True)
        self._pump(f, now, out)
        self._serve_starved(now, out)
        return out

    def set_tenant_limits(self, tenant: str, limits: TenantLimits) -> list[Decision]:
        """Set a tenant's caps. Raising the in-flight cap may dispatch queued requests at
        once, so this returns decisions like every event; lowering it preempts nothing."""
        now = self._clock()
        t = self._tenant(tenant)
        if (limits.rate, limits.burst) != (t.limits.rate, t.limits.burst):
            t.bucket = TokenBucket.create(limits.rate, limits.burst, now)
        t.limits = limits
        t.cap = limits.max_inflight
        out: list[Decision] = []
        self._unblock(t, now, out)
        return out

    def remove(self, function: str) -> list[Decision]:
        """Forget the function: queued requests get 503, running ones 503 too (their
        workers are killed), and every snapshot of it is dropped."""
        f = self._functions.pop(function, None)
        if f is None:
            return []
        now = self._clock()
        out: list[Decision] = []
        reason = f"function {function!r} was removed"
        while f.queued:
            req = self._pop_head(f)
            self._answered(req)
            out.append(Reject(req.id, 503, reason, None))
        f.armed = None
        f.state = FAILED  # nothing may pump it again
        versions = sorted(f.live, key=lambda v: v != f.version)
        f.live.clear()
        tenants: set[_Tenant] = {f.tenant}
        for w in list(f.workers.values()):
            for req in list(w.requests.values()):
                if req.tenant is not None:
                    tenants.add(req.tenant)
                self._end_request(w, req)
                out.append(Fail(req.id, 503, f"{reason} while the request was running"))
            self._kill(w, "removed", out)
        out.extend(DropSnapshot(function, v) for v in versions)
        f.tenant.blocked.pop(function, None)
        self._starved.pop(function, None)
        self._starved_spares.pop(function, None)
        out.append(FunctionState(function, "removed", ""))
        for t in tenants:
            self._unblock(t, now, out)
        self._serve_starved(now, out)
        return out

    # ----------------------------------------------------------------- memory policy

    def unload(self, function: str, reason: str = "unloaded") -> list[Decision]:
        """Stop the snapshot of an idle function, with its idle workers and spares; the
        next request rebuilds it (cold). Does nothing while the function has work in
        flight, queued or forking, or no ready snapshot."""
        f = self._functions.get(function)
        if f is None or f.snap != SNAP_READY or f.queued or f.starting:
            return []
        if any(w.version == f.version and w.inflight for w in f.workers.values()):
            return []
        out: list[Decision] = []
        for w in list(f.workers.values()):
            if w.version == f.version:
                self._kill(w, reason, out)
        f.snap = SNAP_ABSENT
        f.live.discard(f.version)
        out.append(DropSnapshot(function, f.version))
        self._serve_starved(self._clock(), out)
        return out

    def prewarm(self, function: str) -> list[Decision]:
        """Rebuild an unloaded or lost snapshot now, ahead of the request expected."""
        f = self._functions.get(function)
        if f is None or f.snap != SNAP_ABSENT or f.pending is not None:
            return []
        if f.state != SERVING and f.state != TRIAL:
            return []
        out: list[Decision] = []
        self._build_version(f, out, fresh=False)
        return out

    def evict_idle(self, function: str, count: int, reason: str = "evicted") -> list[Decision]:
        """Kill up to ``count`` of the function's workers that have nothing in flight:
        least recently used idle ones first, then spares. Spares are not refilled until the
        function is used again."""
        f = self._functions.get(function)
        if f is None or count <= 0:
            return []
        idle = [w for w in f.free.values() if not w.inflight]
        out: list[Decision] = []
        for w in [*idle, *f.spare.values()][:count]:
            self._kill(w, reason, out)
        self._serve_starved(self._clock(), out)
        return out

    # ----------------------------------------------------------------- requests

    def submit(
        self, request_id: int, function: str, timeout: float | None = None
    ) -> list[Decision]:
        """A request arrived for ``function``: dispatch it, queue it, or refuse it.
        ``timeout``: its own invocation timeout (long async tasks), not the function's."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id} is already in use")
        f = self._functions.get(function)
        if f is None:
            return [Reject(request_id, 404, f"no function named {function!r} is deployed", None)]
        now = self._clock()
        out: list[Decision] = []
        if f.state != SERVING:
            refusal = self._refusal(f, request_id, now, out)
            if refusal is not None:
                out.append(refusal)
                return out
        if f.bucket is not None or f.tenant.bucket is not None:
            refusal = self._rate_limited(f, request_id, now)
            if refusal is not None:
                return [*out, refusal]
        self._arrivals += 1
        req = _Request(request_id, self._arrivals, f, now, f.snap != SNAP_READY)
        req.own_timeout = timeout
        self._requests[request_id] = req
        if not f.queued and (f.free or f.spare) and self._room(f) > 0:
            # The common case: nobody waiting, a worker at hand.
            if f.free:
                w = next(reversed(f.free.values()))
                self._assign(w, req, "cold" if req.cold else "warm", now, out)
            else:
                w = next(iter(f.spare.values()))
                self._assign(w, req, "cold" if req.cold else "spare", now, out)
                self._scale(f, now, out)
            return out
        if f.queued >= f.limits.queue_max:
            del self._requests[request_id]
            self._count(f, "queue_full")
            reason = f"queue full ({f.queued} waiting): {self._blocker(f)}"
            out.append(Reject(request_id, 503, reason, OVERLOAD_RETRY_AFTER))
            return out
        self._enqueue(f, req)
        self._pump(f, now, out)
        return out

    def cancel(self, request_id: int) -> list[Decision]:
        """The client went away. A queued request is dropped (nothing to send); a running
        one is left to its worker, whose answer the shell throws away."""
        req = self._requests.get(request_id)
        if req is None or req.state != _QUEUED:
            return []
        f = req.fn
        self._answered(req)
        f.queued -= 1
        if not f.queued:
            f.queue.clear()
        f.counters["cancelled"] += 1
        return []

    # ----------------------------------------------------------------- snapshots

    def snapshot_ready(self, function: str, version: str) -> list[Decision]:
        """The snapshot of ``version`` is ready: serve from it (switching versions if it is
        the new one)."""
        f = self._functions.get(function)
        if f is None:
            return []
        now = self._clock()
        out: list[Decision] = []
        if version == f.pending:
            self._switch(f, version, out)
        elif version == f.version and f.snap == SNAP_BUILDING:
            f.snap = SNAP_READY
            f.ever_ready = True
            if f.state == BUILDING:
                f.state = SERVING
            out.append(FunctionState(function, "serving", f"version {version} ready"))
        else:
            return []  # a version since abandoned; the shell has its DropSnapshot
        self._pump(f, now, out)
        self._serve_starved(now, out)
        return out

    def snapshot_failed(self, function: str, version: str, error: str) -> list[Decision]:
        """The snapshot of ``version`` could not be built.

        A newer version is refused and the old one keeps serving. A first version fails the
        function: queued and new requests get 503 naming the error until a redeploy. A
        rebuild of a version that served before counts toward the crash loop.
        """
        f = self._functions.get(function)
        if f is None:
            return []
        now = self._clock()
        out: list[Decision] = []
        if version == f.pending:
            f.pending = None
            f.live.discard(version)
            f.last_error = f"version {version} refused: {error}"
            self._count(f, "version_refused")
            state = "serving" if f.state in (SERVING, TRIAL) else f.state
            out.append(FunctionState(function, state, f.last_error))
        elif version == f.version and f.snap == SNAP_BUILDING:
            f.live.discard(version)
            if f.ever_ready:
                f.snap = SNAP_ABSENT
                self._crashed(f, f"snapshot rebuild failed: {error}", now, out)
            else:
                f.snap = SNAP_FAILED
                f.state = FAILED
                f.last_error = error
                self._reject_queue(f, "failed", self._failed_reason(f), None, out)
                out.append(FunctionState(function, "failed", error))
        else:
            return []
        self._pump(f, now, out)
        self._serve_starved(now, out)
        return out

    def snapshot_lost(self, function: str, version: str, error: str) -> list[Decision]:
        """A snapshot process died. Its workers are gone too (the shell reports each); the
        snapshot is rebuilt when a request needs it."""
        f = self._functions.get(function)
        if f is None:
            return []
        if version == f.pending or (version == f.version and f.snap == SNAP_BUILDING):
            return self.snapshot_failed(function, version, error)
        if version not in f.live:
            return []
        now = self._clock()
        out: list[Decision] = []
        f.live.discard(version)
        if version == f.version:
            f.snap = SNAP_ABSENT
            f.last_error = f"snapshot lost: {error}"
        for w in list(f.workers.values()):
            if w.version != version or w.lost:
                continue
            self._detach(w, out)
            w.lost = True
            if w.state == STARTING:
                self._retire_starting(w)
            elif w.state in (SPARE, IDLE):
                self._kill(w, "lost", out)
            elif w.state == BUSY:
                self._begin_draining(w)
        self._pump(f, now, out)
        self._serve_starved(now, out)
        return out

    # ----------------------------------------------------------------- workers

    def worker_ready(self, worker_id: int) -> list[Decision]:
        """A forked worker is up. It takes the head of its function's queue, else it
        becomes a spare (or idle, when the spares are complete)."""
        w = self._workers.get(worker_id)
        if w is None or w.state != STARTING:
            return []
        now = self._clock()
        out: list[Decision] = []
        f = w.fn
        if w.retired or w.recycle:
            self._kill(w, w.recycle or "drained", out)
        else:
            while f.queued and w.inflight < w.slots and self._room(f) > 0:
                req = self._pop_head(f)
                self._assign(w, req, "cold" if req.cold else "fork", now, out)
            if not w.inflight:
                if f.state == SERVING and len(f.spare) < f.limits.spares:
                    self._become_spare(w)
                else:
                    self._become_idle(w, now)
        self._pump(f, now, out)
        self._serve_starved(now, out)
        return out

    def fork_failed(self, worker_id: int, error: str) -> list[Decision]:
        """A Fork did not produce a worker. Counts toward the crash loop."""
        w = self._workers.get(worker_id)
        if w is None or w.state != STARTING:
            return []
        now = self._clock()
        out: list[Decision] = []
        f = w.fn
        counts = self._is_current(w)
        self._forget(w, out)
        f.counters["fork_failures"] += 1
        if counts:
            self._crashed(f, f"fork failed: {error}", now, out)
        self._pump(f, now, out)
        self._serve_starved(now, out)
        return out

    def finished(self, worker_id: int, request_id: int) -> list[Decision]:
        """The worker answered the request (any status: a function's own 500 is a success
        here, the worker lives on). The worker takes the next queued request at once."""
        w = self._workers.get(worker_id)
        if w is None:
            return []
        req = w.requests.get(request_id)
        if req is None:
            return []
        now = self._clock()
        out: list[Decision] = []
        f = w.fn
        if req.state == _AHEAD:
            # Out of turn: only a hostile worker answers what it has not started (the
            # daemon refuses that first); drop it rather than corrupt the books.
            self._end_request(w, req)
            return out
        if w.answered:  # a fresh worker's first invocation pays its page faults: not typical
            took = now - (req.deadline - req.timeout)
            avg = f.service
            f.service = took if avg == math.inf else avg + _SERVICE_WEIGHT * (took - avg)
        if w.ahead is not None:
            self._end_request(w, req)
            self._start_ahead(w, now)
        else:
            self._release(w, req, now, out)
        f.counters["completed"] += 1
        w.answered = True
        if w.version == f.version:
            self._ran(f, out)
        if f.queued or (f.state == SERVING and len(f.spare) + f.starting < f.limits.spares):
            self._pump(f, now, out)
        t = req.tenant
        if t is not None and t.blocked:
            self._unblock(t, now, out)
        if self._starved or self._starved_spares:
            self._serve_starved(now, out)
        return out

    def worker_died(
        self, worker_id: int, reason: str, *, oom: bool = False, killed: bool = False
    ) -> list[Decision]:
        """A worker crashed or exited (``oom``: the kernel's OOM killer took it): each
        request it held gets 502. The request sent ahead to it is dispatched again if it
        cannot have started: the worker died on its own, and its channel was read to the
        end, answers included. ``killed``: the shell killed it at a moment of its choosing,
        when the invocation before may just have ended and this one begun: 502 as well.

        Counts toward the crash loop only as a failure to start: a worker of the serving
        version that dies before it has answered an invocation, of anything but the OOM
        killer (which picks a process of the tenant's cgroup when the tenant as a whole is
        over its limit, whichever invocation caused it). Expected deaths (its snapshot died,
        an old version) never count."""
        w = self._workers.get(worker_id)
        if w is None:
            return []
        now = self._clock()
        out: list[Decision] = []
        f = w.fn
        crashed = self._is_current(w) and not w.answered and not oom
        if not killed:
            self._requeue_ahead(w)
        tenants = self._fail_requests(w, 502, f"worker died: {reason}", out)
        self._forget(w, out)
        f.counters["died"] += 1
        if oom:
            f.counters["oom_kills"] += 1
        if crashed:
            self._crashed(f, f"worker died: {reason}", now, out)
        elif self._is_current(w):
            f.last_error = f"worker died: {reason}"
        if f.queued and f.state == BACKOFF:
            # what was sent ahead came back to a function that refuses work meanwhile
            wait = max(0.0, f.backoff_until - now)
            self._reject_queue(f, "crash_loop", self._crash_loop_reason(f, now), wait, out)
        elif f.queued and f.state == FAILED:
            self._reject_queue(f, "failed", self._failed_reason(f), None, out)
        self._pump(f, now, out)
        for t in tenants:
            self._unblock(t, now, out)
        self._serve_starved(now, out)
        return out

    def worker_memory(self, worker_id: int, rss_or_uss: int) -> list[Decision]:
        """A memory reading of a worker. Above max_worker_memory it is recycled as soon as
        it has nothing in flight (now, if idle) and replaced on demand."""
        w = self._workers.get(worker_id)
        if w is None:
            return []
        w.rss = rss_or_uss
        f = w.fn
        limit = f.limits.max_worker_memory
        if limit is None or rss_or_uss <= limit or w.recycle:
            return []
        now = self._clock()
        out: list[Decision] = []
        w.recycle = "memory"
        f.free.pop(w.id, None)
        if w.state in (SPARE, IDLE):
            self._kill(w, "memory", out)
        self._pump(f, now, out)
        self._serve_starved(now, out)
        return out

    # ----------------------------------------------------------------- time

    def tick(self) -> list[Decision]:
        """Act on everything due: invocation and queue timeouts, idle reaping, backoff
        expiry (and the spares and forks that follow from those)."""
        now = self._clock()
        out: list[Decision] = []
        heap = self._timers
        while heap and heap[0][0] <= now:
            when, _, owner = heapq.heappop(heap)
            if owner.armed != when:
                continue  # superseded by an earlier entry, or the owner is gone
            owner.armed = None
            if isinstance(owner, _Worker):
                self._worker_timer(owner, now, out)
            else:
                self._function_timer(owner, now, out)
        self._serve_starved(now, out)
        return out

    def next_deadline(self) -> float | None:
        """The earliest clock value at which tick() has something to do, or None."""
        heap = self._timers
        while heap:
            when, _, owner = heap[0]
            if owner.armed != when:
                heapq.heappop(heap)
                continue
            due = self._due(owner)
            if due is not None and due <= when:
                return when
            # The entry was a promise to look again; what it guarded has moved on.
            heapq.heappop(heap)
            owner.armed = None
            self._arm(owner, due)
        return None

    # ----------------------------------------------------------------- introspection

    def stats(self, function: str) -> dict[str, Any]:
        """A snapshot of one function's pools, queue, counters and health (KeyError if it is
        not deployed)."""
        f = self._functions[function]
        now = self._clock()
        free_slots = sum(w.slots - w.inflight for w in f.free.values())
        free_slots += sum(w.slots for w in f.spare.values())
        return {
            "function": f.name,
            "tenant": f.tenant.name,
            "version": f.version,
            "pending_version": f.pending,
            "state": f.state,
            "snapshot": f.snap,
            "workers": dict(f.counts),
            "free_slots": free_slots,
            "queued": f.queued,
            "inflight": f.inflight,
            "starts": dict(f.starts),
            "rejections": dict(f.rejected),
            "kills": dict(f.kills),
            **f.counters,
            "crashes": f.crashes,
            "backoff_remaining": max(0.0, f.backoff_until - now) if f.state == BACKOFF else 0.0,
            "last_error": f.last_error,
        }

    def sent_ahead(self, worker_id: int) -> int | None:
        """The request sent ahead to that worker and not started yet, if any: the shell
        must not answer it when the worker goes (it is dispatched again)."""
        w = self._workers.get(worker_id)
        return w.ahead.id if w is not None and w.ahead is not None else None

    def host_stats(self) -> dict[str, Any]:
        """Host-wide totals."""
        return {
            "workers": len(self._workers),
            "max_host_workers": self.max_host_workers,
            "requests": len(self._requests),
            "functions": len(self._functions),
        }

    def functions(self) -> list[str]:
        """Names of the deployed functions."""
        return list(self._functions)

    # ----------------------------------------------------------------- worker transitions

    def _fork(self, f: _Function, out: list[Decision], spare: bool = False) -> None:
        """(none) → starting."""
        wid = self._next_wid
        self._next_wid += 1
        w = _Worker(wid, f, f.version, f.limits.concurrency)
        self._workers[wid] = w
        f.workers[wid] = w
        f.per_version[f.version] = f.per_version.get(f.version, 0) + 1
        f.counts[STARTING] += 1
        f.starting += 1
        f.counters["forks"] += 1
        out.append(Fork(f.name, f.version, wid, spare))

    def _become_spare(self, w: _Worker) -> None:
        """starting → spare: kept unused for the next request while the snapshot serves."""
        self._set_state(w, SPARE)
        w.fn.spare[w.id] = w
        self._spares[w.id] = w

    def _become_idle(self, w: _Worker, now: float) -> None:
        """starting / spare / busy → idle: nothing in flight, reaped after keep_alive."""
        f = w.fn
        if w.state == SPARE:
            del f.spare[w.id]
            del self._spares[w.id]
        self._set_state(w, IDLE)
        w.idle_since = now
        self._idle[w.id] = w
        f.free[w.id] = w
        f.free.move_to_end(w.id)
        due = now + f.limits.keep_alive
        if w.armed is None or due < w.armed:
            self._arm(w, due)

    def _assign(self, w: _Worker, req: _Request, start: StartPath, now: float, out: list) -> None:
        """starting / spare / idle / busy-with-a-free-slot → busy: dispatch the request."""
        f = w.fn
        state = w.state
        if state != BUSY:
            if state == SPARE:
                del f.spare[w.id]
                del self._spares[w.id]
            elif state == IDLE:
                del self._idle[w.id]
            self._set_state(w, BUSY)
        w.inflight += 1
        w.uses += 1
        w.requests[req.id] = req
        req.state = _RUNNING
        lim = f.limits
        req.timeout = req.own_timeout or lim.timeout
        req.deadline = deadline = now + req.timeout
        t = f.tenant
        req.tenant = t
        f.inflight += 1
        t.inflight += 1
        if lim.max_requests and w.uses >= lim.max_requests:
            w.recycle = "recycle"
        if w.inflight < w.slots and w.recycle is None:
            f.free[w.id] = w
            f.free.move_to_end(w.id)
        else:
            f.free.pop(w.id, None)
        if w.armed is None or deadline < w.armed:
            self._arm(w, deadline)
        f.starts[start] += 1
        out.append(Dispatch(req.id, w.id, start))

    def _release(self, w: _Worker, req: _Request, now: float, out: list[Decision]) -> None:
        """A request left the worker with its answer: busy → idle (or still busy with a
        free slot), draining → dead once empty, or dead when due for recycling."""
        self._end_request(w, req)
        if w.state == DRAINING or w.recycle is not None:
            if not w.inflight:
                self._kill(w, w.recycle or "drained", out)
            return
        if w.inflight:
            f = w.fn
            f.free[w.id] = w
            f.free.move_to_end(w.id)
        else:
            self._become_idle(w, now)

    def _start_ahead(self, w: _Worker, now: float) -> None:
        """busy → busy: the request sent ahead starts as the one before it ends (the worker
        has it already: no Dispatch). It is in flight from now, its timeout running."""
        req = w.ahead
        assert req is not None
        w.ahead = None
        w.fn.aheads -= 1
        req.state = _RUNNING
        w.inflight += 1
        w.uses += 1
        f = w.fn
        req.timeout = req.own_timeout or f.limits.timeout
        req.deadline = now + req.timeout
        t = f.tenant
        req.tenant = t
        f.inflight += 1
        t.inflight += 1
        if f.limits.max_requests and w.uses >= f.limits.max_requests:
            w.recycle = "recycle"
            f.free.pop(w.id, None)
        if w.armed is None or req.deadline < w.armed:
            self._arm(w, req.deadline)

    def _requeue_ahead(self, w: _Worker) -> None:
        """The worker is going before it started the request sent ahead: that request goes
        back into its function's queue in its place by arrival (with its age), to be
        dispatched again. Not simply at the head: two workers holding requests sent ahead
        may die in either order."""
        req = w.ahead
        if req is None:
            return
        w.ahead = None
        w.fn.aheads -= 1
        del w.requests[req.id]
        req.state = _QUEUED
        f = req.fn
        q = f.queue
        at = len(q)
        for i, other in enumerate(q):  # (it came from near the head: a short walk)
            if other.state == _QUEUED and other.seq > req.seq:
                at = i
                break
        q.insert(at, req)
        f.queued += 1
        due = req.enqueued + f.limits.queue_timeout
        if f.armed is None or due < f.armed:
            self._arm(f, due)

    def _begin_draining(self, w: _Worker) -> None:
        """busy → draining: finishes what it holds, takes nothing new, then dies."""
        w.fn.free.pop(w.id, None)
        self._set_state(w, DRAINING)

    def _retire_old(self, w: _Worker, out: list[Decision]) -> None:
        """The worker's version no longer serves: drain or kill it."""
        if w.state == STARTING:
            self._retire_starting(w)
        elif w.state in (SPARE, IDLE):
            self._kill(w, "drained", out)
        elif w.state == BUSY:
            self._begin_draining(w)

    def _retire_starting(self, w: _Worker) -> None:
        """A fork in flight that will not be used: killed when it reports ready."""
        if not w.retired:
            w.retired = True
            w.fn.starting -= 1

    def _kill(self, w: _Worker, reason: str, out: list[Decision]) -> None:
        """any → dead, by us."""
        out.append(Kill(w.id, reason))
        kills = w.fn.kills
        kills[reason] = kills.get(reason, 0) + 1
        self._forget(w, out)

    def _forget(self, w: _Worker, out: list[Decision]) -> None:
        """any → dead: drop the worker from every index (its requests are already ended)."""
        f = w.fn
        wid = w.id
        self._set_state(w, DEAD)
        del self._workers[wid]
        del f.workers[wid]
        f.free.pop(wid, None)
        f.spare.pop(wid, None)
        self._idle.pop(wid, None)
        self._spares.pop(wid, None)
        w.armed = None
        if not w.lost:
            self._detach(w, out)

    def _detach(self, w: _Worker, out: list[Decision]) -> None:
        """The worker no longer depends on its snapshot (dead, or the snapshot is)."""
        f = w.fn
        left = f.per_version[w.version] - 1
        if left:
            f.per_version[w.version] = left
        else:
            del f.per_version[w.version]
            self._maybe_drop(f, w.version, out)

    def _set_state(self, w: _Worker, new: str) -> None:
        old = w.state
        counts = w.fn.counts
        if old != DEAD:
            counts[old] -= 1
        if new != DEAD:
            counts[new] += 1
        if old == STARTING and not w.retired:
            w.fn.starting -= 1
        w.state = new

    # ----------------------------------------------------------------- requests, inner

    def _end_request(self, w: _Worker, req: _Request) -> None:
        self._answered(req)
        del w.requests[req.id]
        if req is w.ahead:
            w.ahead = None  # never started: counted nowhere else
            w.fn.aheads -= 1
            return
        w.inflight -= 1
        w.fn.inflight -= 1
        assert req.tenant is not None
        req.tenant.inflight -= 1

    def _answered(self, req: _Request) -> None:
        req.state = _DONE
        del self._requests[req.id]

    def _fail_requests(
        self, w: _Worker, status: int, reason: str, out: list[Decision]
    ) -> set[_Tenant]:
        tenants: set[_Tenant] = set()
        for req in list(w.requests.values()):
            if req.tenant is not None:
                tenants.add(req.tenant)
            self._end_request(w, req)
            out.append(Fail(req.id, status, reason))
        return tenants

    def _enqueue(self, f: _Function, req: _Request) -> None:
        f.queue.append(req)
        f.queued += 1
        if f.queued == 1:
            due = req.enqueued + f.limits.queue_timeout
            if f.armed is None or due < f.armed:
                self._arm(f, due)

    def _head(self, f: _Function) -> _Request:
        """The oldest live queued request (the caller knows there is one)."""
        q = f.queue
        while q[0].state != _QUEUED:
            q.popleft()
        return q[0]

    def _pop_head(self, f: _Function) -> _Request:
        req = self._head(f)
        f.queue.popleft()
        f.queued -= 1
        if not f.queued:
            f.queue.clear()
        return req

    def _reject_queue(
        self,
        f: _Function,
        key: str,
        reason: str,
        retry_after: float | None,
        out: list[Decision],
    ) -> None:
        while f.queued:
            req = self._pop_head(f)
            self._answered(req)
            self._count(f, key)
            out.append(Reject(req.id, 503, reason, retry_after))

    # ----------------------------------------------------------------- dispatch and scaling

    def _room(self, f: _Function) -> int:
        """How many more invocations the function and its tenant allow right now."""
        room = (1 if f.state == TRIAL else f.cap) - f.inflight
        t = f.tenant
        if t.cap is not None and t.cap - t.inflight < room:
            room = t.cap - t.inflight
        return room

    def _pump(self, f: _Function, now: float, out: list[Decision]) -> None:
        """Move queued requests onto free workers (MRU first, then spares), FIFO, as far
        as the caps allow; then fork for what is left."""
        if f.state != SERVING and f.state != TRIAL:
            return
        while f.queued:
            if self._room(f) <= 0:
                t = f.tenant
                if t.cap is not None and t.inflight >= t.cap:
                    t.blocked[f.name] = f
                break
            if f.free:
                w = next(reversed(f.free.values()))
                start: StartPath = "warm"
            elif f.spare:
                w = next(iter(f.spare.values()))
                start = "spare"
            else:
                break
            req = self._pop_head(f)
            self._assign(w, req, "cold" if req.cold else start, now, out)
        self._scale(f, now, out)
        if f.queued and self.send_ahead and f.service <= AHEAD_MAX_SERVICE:
            self._send_ahead(f, now, out)

    def _send_ahead(self, f: _Function, now: float, out: list[Decision]) -> None:
        """Queued requests that no free worker or fork on its way will take go ahead to
        busy process-mode workers of the current version, one each, in FIFO order."""
        if f.state != SERVING or f.limits.concurrency != 1 or f.aheads >= len(f.workers):
            return  # (the last: every worker holds one already, the steady state under load)
        uncovered = f.queued - f.starting
        for w in f.workers.values():
            if uncovered <= 0:
                return
            if (
                w.state != BUSY
                or w.ahead is not None
                or w.recycle is not None
                or w.version != f.version
                or w.slots != 1
            ):
                continue
            running = next(iter(w.requests.values()))
            if now - (running.deadline - running.timeout) > AHEAD_MAX_SERVICE:
                continue  # a long one: the request may be served sooner by another
            req = self._pop_head(f)
            req.state = _AHEAD
            req.deadline = math.inf  # its timeout starts with it
            w.ahead = req
            f.aheads += 1
            w.requests[req.id] = req
            uncovered -= 1
            out.append(Dispatch(req.id, w.id, "cold" if req.cold else "warm", ahead=True))

    def _scale(self, f: _Function, now: float, out: list[Decision]) -> None:
        """Fork for queued requests no worker can take and for missing spares (or rebuild
        a lost snapshot), within max_workers and the host's room."""
        lim = f.limits
        spares_short = lim.spares - len(f.spare) if f.state == SERVING else 0
        if (not f.queued and spares_short <= f.starting) or (
            f.state != SERVING and f.state != TRIAL
        ):
            self._starved.pop(f.name, None)
            self._starved_spares.pop(f.name, None)
            return
        if f.snap != SNAP_READY:
            # Requests wait for a snapshot: the one building, the newer version on its way,
            # or a rebuild of one that was lost.
            self._starved.pop(f.name, None)
            self._starved_spares.pop(f.name, None)
            if f.snap == SNAP_ABSENT and f.queued and f.pending is None:
                self._build_version(f, out, fresh=False)
            return
        if len(f.workers) >= lim.max_workers and (
            self.max_host_workers is None or len(self._workers) <= self.max_host_workers
        ):
            # At its ceiling, with the host not over its own: nothing to fork (the steady
            # state of a busy function, on every request; what follows would conclude so).
            self._starved.pop(f.name, None)
            self._starved_spares.pop(f.name, None)
            return
        room = self._room(f)
        demand = min(f.queued, room) if room > 0 else 0
        for_demand = -(-demand // lim.concurrency)
        wanted = for_demand + max(0, spares_short)
        n_demand = max(0, for_demand - f.starting)
        n_spare = max(0, wanted - f.starting) - n_demand
        cap = lim.max_workers - len(f.workers)
        n_demand = max(0, min(n_demand, cap))
        n_spare = max(0, min(n_spare, cap - n_demand))
        if self.max_host_workers is not None:
            host = self.max_host_workers - len(self._workers)
            if n_demand > host:
                host += self._evict(n_demand - host, f, out)
            if n_demand > host:
                self._starved[f.name] = f
                n_demand = host
            else:
                self._starved.pop(f.name, None)
            if n_spare > host - n_demand:
                self._starved_spares[f.name] = f
                n_spare = host - n_demand
            else:
                self._starved_spares.pop(f.name, None)
        for _ in range(n_demand):
            self._fork(f, out)
        for _ in range(n_spare):
            self._fork(f, out, spare=True)

    def _evict(self, n: int, needy: _Function, out: list[Decision]) -> int:
        """Kill up to n idle workers (least recently idle first), then spares, of functions
        that are not waiting for work, to make room on a full host. Returns how many."""
        victims: list[_Worker] = []
        for w in self._idle.values():
            if len(victims) == n:
                break
            if w.fn is not needy and not w.fn.queued:
                victims.append(w)
        if len(victims) < n:
            for w in self._spares.values():
                if len(victims) == n:
                    break
                if w.fn is not needy:
                    victims.append(w)
        for w in victims:
            if w.state == SPARE:
                self._starved_spares[w.fn.name] = w.fn
            self._kill(w, "evicted", out)
        return len(victims)

    def _serve_starved(self, now: float, out: list[Decision]) -> None:
        """Room may have appeared on the host: queued demand first, then spares."""
        if self.max_host_workers is None:
            return
        for f in list(self._starved.values()):
            if len(self._workers) >= self.max_host_workers and not self._idle and not self._spares:
                return
            if f.name in self._starved:
                self._pump(f, now, out)
        for f in list(self._starved_spares.values()):
            if len(self._workers) >= self.max_host_workers:
                return
            if f.name in self._starved_spares:
                self._pump(f, now, out)

    def _unblock(self, t: _Tenant, now: float, out: list[Decision]) -> None:
        """The tenant has in-flight capacity again: its waiting functions take it in turn
        (a function still blocked goes to the back)."""
        while t.blocked and (t.cap is None or t.inflight < t.cap):
            name = next(iter(t.blocked))
            f = t.blocked.pop(name)
            self._pump(f, now, out)

    # ----------------------------------------------------------------- versions and health

    def _build_version(self, f: _Function, out: list[Decision], *, fresh: bool) -> None:
        """Ask for the snapshot of the current version: ``fresh`` for a version that has
        not served yet (new, or retried after a failure), else a rebuild of a lost one."""
        if fresh:
            f.state = BUILDING
            f.ever_ready = False
            f.crashes = 0
            f.backoff = self.backoff_initial
        f.snap = SNAP_BUILDING
        f.live.add(f.version)
        for req in f.queue:
            req.cold = True
        out.append(BuildSnapshot(f.name, f.version))

    def _switch(self, f: _Function, version: str, out: list[Decision]) -> None:
        """Serve from ``version`` now; the old version's workers drain away."""
        old = f.version
        if f.pending == version:
            f.pending = None
        f.version = version
        f.snap = SNAP_READY
        f.ever_ready = True
        f.live.add(version)
        # New code gets a clean slate: the old version's crashes say nothing about it.
        f.state = SERVING
        f.crashes = 0
        f.backoff = self.backoff_initial
        for w in list(f.workers.values()):
            if w.version != version:
                self._retire_old(w, out)
        for v in list(f.live):
            self._maybe_drop(f, v, out)
        out.append(FunctionState(f.name, "serving", f"version {version} replaces {old}"))

    def _drop_pending(self, f: _Function, out: list[Decision]) -> None:
        assert f.pending is not None
        out.append(DropSnapshot(f.name, f.pending))
        f.live.discard(f.pending)
        f.pending = None

    def _maybe_drop(self, f: _Function, version: str, out: list[Decision]) -> None:
        """Drop a snapshot that neither serves nor has workers left."""
        if (
            version in f.live
            and version != f.version
            and version != f.pending
            and version not in f.per_version
        ):
            f.live.discard(version)
            out.append(DropSnapshot(f.name, version))

    def _is_current(self, w: _Worker) -> bool:
        """Whether the worker's death says something about the code that serves now."""
        return not (w.lost or w.retired) and w.version == w.fn.version

    def _crashed(self, f: _Function, error: str, now: float, out: list[Decision]) -> None:
        """The serving version failed to start: a failed fork, a worker dead before it
        answered anything, a failed snapshot rebuild. The only road into backoff."""
        f.last_error = error
        if f.state == TRIAL:
            f.backoff = min(f.backoff * 2, self.backoff_max)
            self._enter_backoff(f, now, out)
        elif f.state == SERVING:
            f.crashes += 1
            if f.crashes >= self.crash_loop_threshold:
                f.backoff = self.backoff_initial
                self._enter_backoff(f, now, out)

    def _enter_backoff(self, f: _Function, now: float, out: list[Decision]) -> None:
        f.state = BACKOFF
        f.backoff_until = now + f.backoff
        f.crashes = 0
        reason = self._crash_loop_reason(f, now)
        self._reject_queue(f, "crash_loop", reason, f.backoff, out)
        f.tenant.blocked.pop(f.name, None)
        self._starved.pop(f.name, None)
        self._starved_spares.pop(f.name, None)
        self._arm(f, f.backoff_until)
        out.append(FunctionState(f.name, "backoff", reason))

    def _end_backoff(self, f: _Function, out: list[Decision]) -> None:
        f.state = TRIAL
        out.append(FunctionState(f.name, "serving", "backoff over: one trial request at a time"))

    def _ran(self, f: _Function, out: list[Decision]) -> None:
        """A worker of the serving version ran an invocation to its end (an answer, any
        status, or its timeout): the function starts, whatever it did with the input."""
        f.crashes = 0
        if f.state == TRIAL:
            self._recovered(f, out)

    def _recovered(self, f: _Function, out: list[Decision]) -> None:
        f.state = SERVING
        f.backoff = self.backoff_initial
        out.append(FunctionState(f.name, "serving", "recovered from crash loop"))

    # ----------------------------------------------------------------- refusals

    def _refusal(
        self, f: _Function, request_id: int, now: float, out: list[Decision]
    ) -> Reject | None:
        """A function not plainly serving: may the request queue? (None: yes.)"""
        if f.state == BACKOFF:
            if now < f.backoff_until:
                self._count(f, "crash_loop")
                reason = self._crash_loop_reason(f, now)
                return Reject(request_id, 503, reason, f.backoff_until - now)
            self._end_backoff(f, out)
            return None
        if f.state == FAILED:
            self._count(f, "failed")
            return Reject(request_id, 503, self._failed_reason(f), None)
        return None  # building or trial: it may queue

    def _rate_limited(self, f: _Function, request_id: int, now: float) -> Reject | None:
        fb = f.bucket
        tb = f.tenant.bucket
        fwait = fb.wait(now) if fb is not None else 0.0
        twait = tb.wait(now) if tb is not None else 0.0
        if fwait == 0.0 and twait == 0.0:
            if fb is not None:
                fb.take()
            if tb is not None:
                tb.take()
            return None
        if fwait >= twait:
            assert fb is not None
            self._count(f, "rate_limit")
            who = f"function {f.name!r}"
            rate, burst, wait = fb.rate, fb.burst, fwait
        else:
            assert tb is not None
            self._count(f, "tenant_rate_limit")
            who = f"tenant {f.tenant.name!r}"
            rate, burst, wait = tb.rate, tb.burst, twait
        reason = f"rate limit exceeded: {who} allows {rate:g} requests/s (burst {burst:g})"
        return Reject(request_id, 429, reason, wait)

    def _crash_loop_reason(self, f: _Function, now: float) -> str:
        left = max(1, math.ceil(f.backoff_until - now))
        return (
            f"function {f.name!r} is crash-looping; last error: {f.last_error}; retrying in {left}s"
        )

    def _failed_reason(self, f: _Function) -> str:
        return f"function {f.name!r} failed to start: {f.last_error}"

    def _blocker(self, f: _Function) -> str:
        """Why the function's queue is not moving, for the HTTP body of a 503."""
        lim = f.limits
        t = f.tenant
        if f.snap != SNAP_READY:
            return f"waiting for the snapshot of version {f.version}"
        if f.state == TRIAL:
            return "recovering from a crash loop, one request at a time"
        if f.inflight >= f.cap:
            if lim.max_inflight is None:
                return f"all {lim.max_workers} workers (max_workers) are busy"
            return f"function {f.name!r} is at its max_inflight limit ({f.cap})"
        if t.cap is not None and t.inflight >= t.cap:
            return f"tenant {t.name!r} is at its max_inflight limit ({t.cap})"
        if len(f.workers) >= lim.max_workers:
            return f"all {lim.max_workers} workers (max_workers) are busy"
        if self.max_host_workers is not None and len(self._workers) >= self.max_host_workers:
            return f"the host is at its worker limit ({self.max_host_workers})"
        return "workers are starting"

    def _count(self, f: _Function, key: str) -> None:
        f.rejected[key] = f.rejected.get(key, 0) + 1

    # ----------------------------------------------------------------- timers

    def _arm(self, owner: _TimerOwner, when: float | None) -> None:
        if when is None:
            return
        if owner.armed is None or when < owner.armed:
            owner.armed = when
            self.timer_pushes += 1
            heapq.heappush(self._timers, (when, next(self._seq), owner))

    def _due(self, owner: _TimerOwner) -> float | None:
        if isinstance(owner, _Worker):
            return self._worker_due(owner)
        return self._function_due(owner)

    def _worker_due(self, w: _Worker) -> float | None:
        if w.state == DEAD:
            return None
        if w.inflight:
            return min(r.deadline for r in w.requests.values())
        if w.state == IDLE:
            return w.idle_since + w.fn.limits.keep_alive
        return None

    def _function_due(self, f: _Function) -> float | None:
        if self._functions.get(f.name) is not f:
            return None
        due = self._head(f).enqueued + f.limits.queue_timeout if f.queued else None
        if f.state == BACKOFF and (due is None or f.backoff_until < due):
            due = f.backoff_until
        return due

    def _worker_timer(self, w: _Worker, now: float, out: list[Decision]) -> None:
        if w.inflight:
            expired = [r for r in w.requests.values() if r.deadline <= now]
            if expired:
                self._timed_out(w, expired, now, out)
                return
        elif w.state == IDLE and w.idle_since + w.fn.limits.keep_alive <= now:
            self._kill(w, "idle", out)
            return
        self._arm(w, self._worker_due(w))

    def _timed_out(
        self, w: _Worker, expired: list[_Request], now: float, out: list[Decision]
    ) -> None:
        """Invocation timeout: the worker is killed (a Python thread cannot be stopped), and
        everything it held is answered."""
        f = w.fn
        counts = self._is_current(w)
        tenants: set[_Tenant] = set()
        # The request sent ahead is failed, not queued again: the invocation before it may
        # have finished just before the kill, and then the worker may have started this one.
        # Run elsewhere it could run twice; a 502 is the honest answer (as for any request
        # a killed worker held).
        for req in list(w.requests.values()):
            if req is w.ahead:
                self._end_request(w, req)
                out.append(
                    Fail(req.id, 502, "worker killed: the invocation before it timed out")
                )
                continue
            assert req.tenant is not None
            tenants.add(req.tenant)
            self._end_request(w, req)
            if req.deadline <= now:
                out.append(Fail(req.id, 504, f"function timed out after {req.timeout:g}s"))
            else:
                out.append(Fail(req.id, 502, "worker stopped: another invocation on it timed out"))
        f.counters["timeouts"] += len(expired)
        self._kill(w, "timeout", out)
        if counts:
            # It ran the invocation until its deadline: the function starts, it is just slow
            # (or hung) on that input.
            f.last_error = f"timed out after {expired[0].timeout:g}s"
            self._ran(f, out)
        self._pump(f, now, out)
        for t in tenants:
            self._unblock(t, now, out)

    def _function_timer(self, f: _Function, now: float, out: list[Decision]) -> None:
        if self._functions.get(f.name) is not f:
            return
        if f.state == BACKOFF and f.backoff_until <= now:
            self._end_backoff(f, out)
            self._pump(f, now, out)
        qt = f.limits.queue_timeout
        while f.queued:
            head = self._head(f)
            if head.enqueued + qt > now:
                break
            reason = f"queue timeout after {qt:g}s: {self._blocker(f)}"
            self._pop_head(f)
            self._answered(head)
            self._count(f, "queue_timeout")
            out.append(Reject(head.id, 503, reason, OVERLOAD_RETRY_AFTER))
        self._arm(f, self._function_due(f))

    # ----------------------------------------------------------------- limits

    def _tenant(self, name: str) -> _Tenant:
        t = self._tenants.get(name)
        if t is None:
            t = self._tenants[name] = _Tenant(name)
        return t

    def _apply_limits(
        self, f: _Function, limits: FunctionLimits, now: float, out: list[Decision]
    ) -> None:
        old = f.limits
        if limits == old:
            return
        f.limits = limits
        f.cap = limits.inflight_cap
        if (limits.rate, limits.burst) != (old.rate, old.burst):
            f.bucket = TokenBucket.create(limits.rate, limits.burst, now)
        # Fewer spares wanted: the extra ones become ordinary idle workers and age out.
        for w in list(f.spare.values())[limits.spares :]:
            self._become_idle(w, now)
        # Fewer workers allowed: shed what has nothing in flight (spares first, then the
        # least recently used idle), then forks in flight; busy ones go when they finish.
        excess = len(f.workers) - limits.max_workers
        if excess > 0:
            idle = [w for w in f.free.values() if not w.inflight]
            for w in [*f.spare.values(), *idle][:excess]:
                self._kill(w, "idle", out)
                excess -= 1
            for w in list(f.workers.values()):
                if excess <= 0:
                    break
                if w.state == STARTING and not w.retired:
                    self._retire_starting(w)
                    excess -= 1
                elif w.state == BUSY and w.recycle is None:
                    w.recycle = "recycle"
                    f.free.pop(w.id, None)
                    excess -= 1
        # Shorter timeouts take effect for what is already waiting or idle.
        for w in f.workers.values():
            self._arm(w, self._worker_due(w))
        self._arm(f, self._function_due(f))
