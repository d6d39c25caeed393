"""The composition root: ingress → scheduler → worker channel, and the processes behind them.

:class:`Runtime` is the thin shell around the sans-I/O scheduler core
(:mod:`hourai.scheduler.core`): it turns HTTP requests, zygote replies, worker results and
timer ticks into scheduler events, and carries out the decisions that come back (send an
invocation, answer, build a snapshot, fork, kill). All of it runs on one event loop; the
only processes it touches are the zygotes (commands) and workers (invocations, SIGKILL).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from hourai.cgroup import (
    DEFAULT_TENANT_LIMITS,
    CgroupBackend,
    CgroupError,
    TenantLimits,
    detect,
    merge_declared,
)
from hourai.cgroup.owner import SubtreeClaim, claim_subtree
from hourai.channel import AsyncChannel
from hourai.codestore import CodeStore
from hourai.debug import Debugger
from hourai.ingress import Request, Response, error_response
from hourai.invocations.runner import Delivery, InvokeEvent, Outcome
from hourai.isolate import sandbox
from hourai.packages.installer import IndexSettings, Installer
from hourai.packages.store import PackageStore
from hourai.protocol import (
    RESPONSE_OVERHEAD,
    FrameTooLarge,
    ProtocolError,
    ResponseTooLarge,
    Violation,
    check_worker_reply,
    response_frame_limit,
)
from hourai.registry import FunctionSpec, default_env
from hourai.resources import ResourceManager
from hourai.scheduler.core import (
    BuildSnapshot,
    Decision,
    Dispatch,
    DropSnapshot,
    Fail,
    Fork,
    FunctionState,
    Kill,
    Reject,
    Scheduler,
)
from hourai.scheduler.limits import FunctionLimits
from hourai.scheduler.limits import TenantLimits as TenantCaps
from hourai.scheduler.policy import PolicyParams
from hourai.snapshot.manager import (
    ExitStatus,
    OutputReader,
    RootZygote,
    SnapshotFailed,
    SnapshotHandle,
    WorkerEvents,
    function_of,
    kill_pid,
)
from hourai.snapshot.tree import (
    MIGRATIONS_PER_TICK,
    Group,
    NodeKey,
    ZygoteNode,
    ZygoteTree,
    output_name,
)
from hourai.streaming import WorkerStream
from hourai.tenants import DEFAULT_UID_RANGE, TenantDirectory
from hourai.tracing import RequestTrace, Tracer, TracingSettings
from hourai.units import format_size

log = logging.getLogger("hourai")
access_log = logging.getLogger("hourai.access")
function_log = logging.getLogger("hourai.function")

# A worker's channel closes a moment before its snapshot reports the exit status; wait this
# long for the status so the 502 can say what happened (signal, exit code, OOM).
_EXIT_STATUS_GRACE = 0.5
WORKER_MEMORY_INTERVAL = 1.0
# A spare refill waits for the request that used the spare to be answered, or this long.
REFILL_DELAY = 0.005
# A dead root zygote is restarted at once, then with doubling delays while it keeps failing.
ZYGOTE_RESTART_DELAY = 0.2
TREE_INTERVAL = 1.0  # seconds between the zygote tree's moves and collections
ZYGOTE_RESTART_MAX_DELAY = 30.0
DEFAULT_MAX_RESPONSE = FunctionLimits().max_response_size  # a removed function's last answers
# The mark a worker puts before the lines of an invocation (hourai.isolate.context): its
# request id, and its trace id when traced. Checked, since a function can print anything.
_LINE_MARK = re.compile(r"\x1f([0-9a-f]{1,16}-[0-9]{1,10})(?: ([0-9a-f]{32}))?\x1f")
# A worker told that its stream's client went away has this long to end the stream (it sees
# the cancel at its next chunk) before it is killed and replaced.
CANCEL_GRACE = 2.0
# Chunk frames a worker sends are at most this large (and at most max_response_size).
STREAM_CHUNK = 256 * 1024


class DeployError(Exception):
    """A version was refused; ``details`` holds the traceback from the snapshot."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


class Observer:
    """Hooks for what watches the runtime (metrics, per-function log files). Called on the
    event loop, on the request path for ``request_done``: keep them cheap."""

    def request_done(self, function: str, status: int, start: str, seconds: float) -> None:
        pass

    def function_output(self, function: str, tag: str, line: str) -> None:
        pass

    def function_state(self, state: FunctionState) -> None:
        pass

    def function_verdict(self, function: str, message: str) -> None:
        """What the daemon decided about one of the function's workers or requests (killed
        for breaking the protocol, timed out, died and why): it belongs in that function's
        log, so its owner can read the whole story there."""

    # An observer that keeps function output (the per-function log files) says so; without
    # one (`hourai run`, a terminal) the output is copied into the daemon's own log instead.
    keeps_function_output = False


@dataclass
class RuntimeSettings:
    # None: a private temporary state dir, removed at stop (what `hourai run` uses).
    state_dir: Path | None = None
    preloads: list[str] = field(default_factory=list)
    max_host_workers: int | None = None
    server_name: str = "hourai"
    cgroup_backend: str = "auto"  # auto | v2 | v1 | none
    # Our groups live at <daemon's own cgroup>/<subtree>/<tenant>; a crashed run's leftovers
    # under the same subtree are removed at start. None: a subtree private to this process
    # (`hourai run`, benchmarks), so several can run side by side.
    cgroup_subtree: str | None = None
    uid_range: tuple[int, int] = DEFAULT_UID_RANGE
    # Every tenant's limits unless it says otherwise; and what the operator set per tenant.
    tenant_defaults: TenantLimits = DEFAULT_TENANT_LIMITS
    tenant_config: dict[str, dict[str, Any]] = field(default_factory=dict)  # field -> value
    separate_uids: bool | None = None  # None: when running as root
    worker_nofile: int = 1024
    # A 500 says the exception's type and message (False: only the error id, for callers
    # who must not see a function's internals).
    show_errors: bool = True
    # Python 3.12+: make the zygotes' and snapshots' objects immortal before they fork, so
    # workers reading them copy no pages (hourai.snapshot.immortal); off only to measure it.
    immortalize: bool = True
    # The adaptive resource policy (snapshot keep-alive, pre-warm, eviction, admission,
    # tenant limit sizing); None: snapshots stay until removed.
    policy: PolicyParams | None = field(default_factory=PolicyParams)
    # Where functions' declared packages come from ([packages] in the config).
    packages: IndexSettings = field(default_factory=IndexSettings)
    # OpenTelemetry traces ([tracing] in the config); off unless enabled.
    tracing: TracingSettings = field(default_factory=TracingSettings)
    # Package zygotes for functions that import the same packages (hourai.snapshot.tree).
    zygote_tree: bool = True


@dataclass(eq=False)
class Pending:
    """One request on its way through the scheduler."""

    rid: int
    spec: FunctionSpec
    request: Request
    root_path: str
    path: str
    future: asyncio.Future[Response]
    started: float  # scheduler clock (loop time), for the remaining time budget
    t0: float = field(
        default_factory=time.perf_counter
    )  # for latency: loop.time() is ms-grained in uvloop
    start: str = "-"
    wid: int | None = None
    timeout: float | None = None  # its own invocation timeout (async); None: the function's
    event: bytes | None = None  # a direct invocation's event (JSON), instead of HTTP
    trace: RequestTrace | None = None  # its spans, when tracing is on
    streamable: bool = False  # the caller takes a streaming response (HTTP ingress)
    stream: WorkerStream | None = None  # its head was answered; the body is on its way
    status: int = 0  # a streaming response's status, for the log at its end
    # The future's callback for a caller that gives up; taken off before the answer is set,
    # so that an answered request costs the loop no callback that would find nothing to do.
    gave_up: Callable[[asyncio.Future[Response]], None] | None = None


@dataclass(eq=False)
class WorkerProc:
    wid: int
    function: str
    version: str
    pid: int = 0
    channel: AsyncChannel | None = None
    output: OutputReader | None = None
    inflight: dict[int, Pending] = field(default_factory=dict)
    killed: bool = False
    exit: ExitStatus | None = None
    tenant: str = ""
    oom_mark: int = 0  # the tenant's OOM kill count when forked: a later rise means OOM
    # Wall-clock ns of the fork (asked, ready), for the trace of the request it started.
    fork_ns: tuple[int, int] = (0, 0)
    served: bool = False


@dataclass(eq=False)
class Version:
    spec: FunctionSpec
    handle: SnapshotHandle | None = None
    built: asyncio.Future[dict[str, Any]] | None = None
    workers_by_pid: dict[int, WorkerProc] = field(default_factory=dict)
    build_started: float = 0.0
    build_ns: tuple[int, int] = (0, 0)  # wall clock, for traces of cold starts


class Runtime:
    def __init__(self, settings: RuntimeSettings | None = None) -> None:
        self.settings = settings or RuntimeSettings()
        self.loop = asyncio.get_running_loop()
        # send_ahead: a busy process-mode worker gets its next invocation before it asks.
        self.scheduler = Scheduler(
            self.loop.time, max_host_workers=self.settings.max_host_workers, send_ahead=True
        )
        self.zygote = self._new_zygote()
        # Builds asked for while the root zygote is down: done once it is back.
        self._builds_waiting: list[tuple[str, str]] = []
        self._zygote_restarts = 0
        self._zygote_started = 0.0
        self._zygote_backoff = 0.0
        self.functions: dict[str, FunctionSpec] = {}
        self.versions: dict[tuple[str, str], Version] = {}
        self.workers: dict[int, WorkerProc] = {}
        self.pending: dict[int, Pending] = {}
        self._rids = itertools.count(1)
        self._fids = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._timer_pushes = -1
        self._tasks: set[asyncio.Task[Any]] = set()
        self.observers: list[Observer] = []
        self.started = time.time()
        self._refills: list[tuple[SnapshotHandle, int, bool]] = []
        self._refill_timer: asyncio.TimerHandle | None = None
        self._own_state_dir = self.settings.state_dir is None
        self.state_dir = self.settings.state_dir or Path(tempfile.mkdtemp(prefix="hourai-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Tenants must pass through to their code and temp dir, but not list anything.
        os.chmod(self.state_dir, 0o711)
        if self.settings.separate_uids is not False and os.geteuid() == 0:
            blocked = sandbox.unreachable_ancestor(str(self.state_dir))
            if blocked is not None:
                raise RuntimeError(
                    f"the state dir {self.state_dir} is out of reach of tenant uids: {blocked} "
                    f"is not searchable by others (chmod o+x {blocked}, or pick another dir)"
                )
        self.cgroups: CgroupBackend = detect(
            self.settings.cgroup_backend,
            subtree=self.settings.cgroup_subtree or f"hourai-run-{os.getpid()}",
        )
        self.tenants = TenantDirectory(
            self.state_dir,
            self.settings.uid_range,
            separate=self.settings.separate_uids,
            persistent=not self._own_state_dir,
        )
        self.codestore = CodeStore(
            self.state_dir / "code", group_of=lambda tenant: self.tenants.get(tenant).gid
        )
        self.packages = PackageStore(self.state_dir / "packages", Installer(self.settings.packages))
        self.tenant_limits: dict[str, TenantLimits] = {}
        self.subtree_claim: SubtreeClaim | None = None
        self.resources = (
            ResourceManager(self, self.settings.policy) if self.settings.policy else None
        )
        self.tracer = Tracer(self.settings.tracing) if self.settings.tracing.enabled else None
        self.debugger = Debugger(self)
        # Package zygotes of the functions' packages (hourai.snapshot.tree); what was
        # learned is kept only where the state dir is.
        self.tree = ZygoteTree(
            self.loop,
            None if self._own_state_dir else self.state_dir / "zygotes.json",
            self._function_output,
        )
        self.tree.enabled = self.settings.zygote_tree

    def problems(self) -> list[str]:
        """What keeps the runtime from serving as deployed, right now (for /healthz)."""
        out = []
        if not self.zygote.running:
            out.append("the root zygote is not running: no snapshot can be built")
        for tenant in sorted({spec.tenant for spec in self.functions.values()}):
            if not self.cgroups.exists(tenant):
                out.append(
                    f"tenant {tenant}: its cgroup is gone (recreated at its next snapshot build)"
                )
        return out

    @property
    def warnings(self) -> list[str]:
        """What a user must know about this host's isolation (printed at start, in stats)."""
        return [w for w in (self.cgroups.warning, self.tenants.warning) if w]

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        log.info("cgroups: %s", self.cgroups.describe())
        for warning in self.warnings:
            log.warning("%s", warning)
        # Ours before anything in it is touched: what is left there is then provably not
        # another live daemon's (SubtreeInUse, a CgroupError, says whose it is).
        self.subtree_claim = claim_subtree(self.cgroups.subtree_dirs(), str(self.state_dir))
        stale = self.cgroups.cleanup_stale()
        if stale:
            log.warning("removed cgroups left by an earlier run: %s", ", ".join(stale))
        await self.zygote.start()
        self._zygote_started = self.loop.time()
        if self.resources is not None:
            self._spawn(self._supervise(self.resources.run, "adaptive policy"), "policy")
        self._spawn(
            self._supervise(self._watch_worker_memory, "worker memory watch"), "memory watch"
        )
        self._spawn(self._supervise(self._tend_tree, "zygote tree"), "zygote tree")

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.resources is not None and not self._own_state_dir:
            try:
                self.resources.save()
            except OSError as exc:
                log.warning("could not save the policy state: %s", exc)
        for task in list(self._tasks):
            task.cancel()
        self.debugger.stop_all()
        for pending in list(self.pending.values()):
            self._answer(pending, error_response(503, "hourai is shutting down"))
        for worker in list(self.workers.values()):
            worker.killed = True
            if worker.channel is not None:
                worker.channel.close("daemon stopping")
            if worker.output is not None:
                worker.output.close()
        self.zygote.on_lost = None
        for version in self.versions.values():
            if version.handle is not None:
                version.handle.stopping = True
        self.tree.stop_all()
        await self.zygote.stop()
        if self.tracer is not None:
            self.tracer.shutdown()
        if self.subtree_claim is not None:
            try:
                self.cgroups.remove_subtree()
            except CgroupError as exc:
                log.warning("could not remove hourai's cgroups: %s", exc)
            self.subtree_claim.release()
            self.subtree_claim = None
        if self._own_state_dir:
            self.tenants.release()
            shutil.rmtree(self.state_dir, ignore_errors=True)

    async def _tend_tree(self) -> None:
        """Move snapshots onto the zygote the plan gives them, while they cost nobody a
        request (no workers at all); stop zygotes nobody needs any more."""
        while True:
            await asyncio.sleep(TREE_INTERVAL)
            self.tree.grow(self._launch_zygote, self._zygote_spec)
            moved = 0
            for name in list(self.functions):
                if moved >= MIGRATIONS_PER_TICK:
                    break
                if not self.tree.wanted(name):
                    continue
                try:
                    stats = self.scheduler.stats(name)
                except KeyError:
                    continue
                if stats["snapshot"] != "ready" or any(stats["workers"].values()):
                    continue
                if stats["queued"] or stats["inflight"]:
                    continue
                log.info("%s: rebuilding its snapshot on its zygote", name)
                self.unload(name, "rebuilt on its zygote")
                self.prewarm(name)
                moved += 1
            self.tree.collect()

    async def _watch_worker_memory(self) -> None:
        """Report the RSS of workers whose function caps it, so the scheduler can recycle
        one that grew past it (the remedy for leaks). /proc/PID/statm is one small read."""
        page = os.sysconf("SC_PAGE_SIZE")
        while True:
            await asyncio.sleep(WORKER_MEMORY_INTERVAL)
            for worker in list(self.workers.values()):
                spec = self.functions.get(worker.function)
                if spec is None or spec.limits.max_worker_memory is None or not worker.pid:
                    continue
                try:
                    with open(f"/proc/{worker.pid}/statm") as f:
                        rss = int(f.read().split()[1]) * page
                except (OSError, ValueError, IndexError):
                    continue
                self._apply(self.scheduler.worker_memory(worker.wid, rss))

    async def drain(self, timeout: float) -> bool:
        """Wait until no request is queued or running, up to `timeout`; True if drained.
        (The caller stops accepting new requests first.)"""
        deadline = self.loop.time() + timeout
        while self.pending and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        return not self.pending

    def _spawn(self, coro: Any, what: str) -> None:
        """Every background task is owned here: kept, cancelled at stop, its failure logged."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("%s failed", what, exc_info=t.exception())

        task.add_done_callback(done)

    async def _supervise(self, loop_body: Callable[[], Any], what: str) -> None:
        """Run a loop the runtime depends on for as long as the runtime runs: one that
        fails is logged and started again, after a delay that doubles while it keeps
        failing soon after its start."""
        delay = 0.5
        while True:
            started = self.loop.time()
            try:
                await loop_body()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed; restarting it in %.1fs", what, delay)
            delay = 0.5 if self.loop.time() - started > 60 else min(delay * 2, 60.0)
            await asyncio.sleep(delay)

    def _new_zygote(self) -> RootZygote:
        zygote = RootZygote(
            self.loop,
            preloads=self.settings.preloads,
            output_sink=self._function_output,
            immortalize=self.settings.immortalize,
        )
        zygote.on_lost = self._zygote_lost
        return zygote

    def _zygote_lost(self, reason: str) -> None:
        # Its snapshots die with it (and report themselves lost); a new one serves the
        # rebuilds. Until it is up, /healthz says so and builds wait for it.
        log.critical("root zygote died (%s): restarting it", reason)
        self._spawn(self._restart_zygote(), "root zygote restart")

    async def _restart_zygote(self) -> None:
        self.zygote.kill()  # and reap it
        # One that keeps dying soon after its start is restarted more and more slowly.
        short_lived = self.loop.time() - self._zygote_started < ZYGOTE_RESTART_MAX_DELAY
        self._zygote_backoff = (
            min(max(self._zygote_backoff * 2, ZYGOTE_RESTART_DELAY), ZYGOTE_RESTART_MAX_DELAY)
            if short_lived
            else 0.0
        )
        await asyncio.sleep(self._zygote_backoff)
        delay = ZYGOTE_RESTART_DELAY
        while True:
            self._zygote_restarts += 1
            self.zygote.kill()
            zygote = self._new_zygote()
            try:
                await zygote.start()
            except (RuntimeError, OSError) as exc:
                log.error("root zygote restart failed (%s); next try in %.1fs", exc, delay)
                zygote.on_lost = None
                zygote.kill()
                await asyncio.sleep(delay)
                delay = min(delay * 2, ZYGOTE_RESTART_MAX_DELAY)
                continue
            self.zygote = zygote
            self._zygote_started = self.loop.time()
            log.warning("root zygote restarted (pid %s)", zygote.pid)
            waiting, self._builds_waiting = self._builds_waiting, []
            for function, version in waiting:
                if (function, version) in self.versions:
                    self._build(function, version)
            return

    # ------------------------------------------------------------------ deploy

    async def deploy(self, spec: FunctionSpec) -> dict[str, Any]:
        """Build the version's snapshot and switch traffic to it; raise DeployError if it
        cannot be built (the previous version, if any, keeps serving)."""
        key = (spec.name, spec.version)
        existing = self.versions.get(key)
        if (
            existing is not None
            and existing.built is not None
            and existing.built.done()
            and not existing.built.exception()
        ):
            self.functions[spec.name] = spec
            self._declare(spec)
            self._apply(self.scheduler.deploy(spec.name, spec.version, spec.tenant, spec.limits))
            return existing.built.result()
        self._declare(spec)
        version = Version(spec, built=self.loop.create_future())
        self.versions[key] = version
        self.functions.setdefault(spec.name, spec)
        self._apply(self.scheduler.deploy(spec.name, spec.version, spec.tenant, spec.limits))
        assert version.built is not None
        try:
            info = await asyncio.shield(version.built)
        except SnapshotFailed as exc:
            raise DeployError(str(exc), exc.details) from None
        self.functions[spec.name] = spec
        return info

    def _declare(self, spec: FunctionSpec) -> None:
        """The tenant exists (uid, cgroup with its limits) and the policy knows the function."""
        self.tenants.get(spec.tenant)
        self.tree.function(spec.name, self._group(spec), spec.preload)
        limits = self.effective_tenant_limits(spec.tenant, deploying=spec)
        self.cgroups.create(spec.tenant, limits)
        self.tenant_limits[spec.tenant] = limits
        if self.resources is not None:
            self.resources.declare_tenant(spec.tenant, limits)
            self.resources.register(spec.name, spec.tenant)

    def effective_tenant_limits(
        self, tenant: str, deploying: FunctionSpec | None = None
    ) -> TenantLimits:
        """A tenant's limits are the tenant's, whichever function is deployed last: the
        defaults, overlaid with what its functions declare (per field the largest: one that
        declares only pids drops nothing), overlaid with what the operator set for the
        tenant, which wins. What the adaptive policy sized (memory.high, cpu weight) stays
        unless one of those sets it."""
        specs = {n: s for n, s in self.functions.items() if s.tenant == tenant}
        if deploying is not None:
            specs[deploying.name] = deploying
        declared = merge_declared([s.resources for s in specs.values() if s.resources])
        limits = dataclasses.replace(
            self.settings.tenant_defaults.overlay(declared),
            **self.settings.tenant_config.get(tenant, {}),
        )
        sized = self.tenant_limits.get(tenant)
        if sized is not None:
            limits = dataclasses.replace(
                limits,
                memory_high=limits.memory_high or sized.memory_high,
                cpu_weight=limits.cpu_weight or sized.cpu_weight,
            )
        return limits

    def set_tenant_config(
        self, defaults: TenantLimits, per_tenant: Mapping[str, Mapping[str, Any]]
    ) -> list[str]:
        """New operator limits (a config reload): applied to every tenant at once; returns
        the tenants whose limits could not be written, with why."""
        self.settings.tenant_defaults = defaults
        self.settings.tenant_config = {t: dict(v) for t, v in per_tenant.items()}
        failed = []
        for tenant in sorted({s.tenant for s in self.functions.values()}):
            try:
                self._apply_tenant_limits(tenant)
            except CgroupError as exc:
                failed.append(f"{tenant}: {exc}")
        return failed

    def _apply_tenant_limits(self, tenant: str) -> None:
        limits = self.effective_tenant_limits(tenant)
        if limits != self.tenant_limits.get(tenant):
            self.cgroups.set_limits(tenant, limits)
            self.tenant_limits[tenant] = limits
            if self.resources is not None:
                self.resources.declare_tenant(tenant, limits)

    def remove(self, name: str) -> None:
        self.debugger.close(name, "the function was removed")
        self._apply(self.scheduler.remove(name))
        spec = self.functions.pop(name, None)
        self.tree.forget(name)
        if self.resources is not None:
            self.resources.forget(name)
        if spec is not None and any(s.tenant == spec.tenant for s in self.functions.values()):
            # what only this function declared no longer counts for its tenant
            try:
                self._apply_tenant_limits(spec.tenant)
            except CgroupError as exc:
                log.warning("tenant %s: could not lower its limits: %s", spec.tenant, exc)

    def set_tenant_caps(self, tenant: str, caps: TenantCaps) -> None:
        """Caps over all of a tenant's functions: concurrent invocations, rate."""
        self._apply(self.scheduler.set_tenant_limits(tenant, caps))

    def prewarm(self, name: str) -> None:
        """Build the function's snapshot ahead of its next request."""
        self._apply(self.scheduler.prewarm(name))

    def evict_idle(self, name: str, count: int, reason: str = "evicted") -> None:
        self._apply(self.scheduler.evict_idle(name, count, reason))

    def unload(self, name: str, reason: str = "unloaded") -> None:
        """Stop the function's snapshot and idle workers; the next request rebuilds it."""
        self._apply(self.scheduler.unload(name, reason))

    def _build(self, function: str, version_id: str) -> None:
        version = self.versions.get((function, version_id))
        if version is None:
            spec = self.functions[function]
            version = self.versions[(function, version_id)] = Version(spec)
        if version.built is None or version.built.done():
            version.built = self.loop.create_future()
        spec = version.spec
        if not self.cgroups.exists(spec.tenant):
            # Removed under us (by hand, or by a tool that thought it stale): put it back
            # with the tenant's limits rather than let the snapshot fail to join it.
            log.warning("tenant %s: its cgroup was gone; recreating it", spec.tenant)
            limits = self.effective_tenant_limits(spec.tenant)
            try:
                self.cgroups.create(spec.tenant, limits)
            except CgroupError as exc:
                self._build_failed(
                    version, SnapshotFailed(f"tenant {spec.tenant}'s cgroup is gone: {exc}")
                )
                return
        if not self.zygote.running:
            self._builds_waiting.append((function, version_id))
            return
        fid = f"{function}@{version_id}#{next(self._fids)}"
        events = WorkerEvents(
            forked=lambda wid, pid, sock, out: self._worker_forked(version, wid, pid, sock, out),
            fork_failed=self._fork_failed,
            exited=self._worker_exited,
        )
        snapshot_spec = self._snapshot_spec(spec)
        parent, snapshot_spec["preload"] = self.tree.parent_for(
            function, self._launch_zygote, self._zygote_spec
        )
        tag = f"{function}/snapshot"
        try:
            if parent is None:
                handle = self.zygote.spawn(fid, snapshot_spec, events, tag)
            else:
                handle = SnapshotHandle(fid, events, self.loop.create_future())
                parent.spawn_handle(handle, snapshot_spec, tag)
        except RuntimeError as exc:
            self._build_failed(version, SnapshotFailed(str(exc)))
            return
        version.handle = handle
        version.build_started = self.loop.time()
        version.build_ns = (time.time_ns(), 0)
        handle.on_lost = lambda reason: self._snapshot_lost(version, reason)
        self._spawn(self._await_build(version, handle), f"snapshot build {fid}")

    async def _await_build(self, version: Version, handle: SnapshotHandle) -> None:
        spec = version.spec
        try:
            info = await handle.ready
        except SnapshotFailed as exc:
            self._build_failed(version, exc)
            return
        log.info(
            "%s version %s ready: %s %s:%s in %.1f ms",
            spec.name,
            spec.version,
            info["kind"],
            spec.target.module,
            info["attr"],
            info["init_ms"],
        )
        version.build_ns = (version.build_ns[0], time.time_ns())
        self.tree.built(spec.name, info.get("modules", ()))
        if version.built is not None and not version.built.done():
            version.built.set_result(info)
        if self.resources is not None:
            rebuild = self.loop.time() - version.build_started
            self.resources.snapshot_built(spec.name, rebuild, handle.pid)
        self._apply(self.scheduler.snapshot_ready(spec.name, spec.version))

    def _build_failed(self, version: Version, exc: SnapshotFailed) -> None:
        spec = version.spec
        log.error("%s version %s failed to build: %s", spec.name, spec.version, exc)
        if exc.details and exc.details.strip() != str(exc):
            function_log.error("[%s/snapshot] %s", spec.name, exc.details.rstrip())
        if version.built is not None and not version.built.done():
            version.built.set_exception(exc)
            version.built.exception()  # retrieved: a refused deploy is not an unhandled error
        self.versions.pop((spec.name, spec.version), None)
        if version.handle is not None:
            (version.handle.parent or self.zygote).forget(version.handle.fid)
        self._apply(self.scheduler.snapshot_failed(spec.name, spec.version, str(exc)))

    def _snapshot_lost(self, version: Version, reason: str) -> None:
        spec = version.spec
        log.error("%s version %s: snapshot process lost (%s)", spec.name, spec.version, reason)
        version.handle = None
        self._apply(self.scheduler.snapshot_lost(spec.name, spec.version, reason))

    def _group(self, spec: FunctionSpec) -> Group:
        return (spec.tenant, None if spec.packages is None else tuple(spec.packages))

    def _launch_zygote(self, node: ZygoteNode, spec: dict[str, Any]) -> None:
        self.zygote.launch(node, spec, output_name(node.key[0]))

    def _zygote_spec(self, key: NodeKey) -> dict[str, Any]:
        """A package zygote's: confined as its tenant's snapshots are (see _snapshot_spec),
        with none of any one function's environment, code or limits."""
        tenant_name, packages, _modules = key
        tenant = self.tenants.get(tenant_name)
        sandboxed = tenant.uid is not None
        group = [s for s in self.functions.values() if self._group(s) == key[:2]]
        return {
            "role": "zygote",
            "function": output_name(tenant_name),
            "env": default_env("", "/tmp" if sandboxed else str(tenant.tmpdir)),
            "cwd": "" if sandboxed else str(tenant.tmpdir),
            # every function of the tenant's code lives below this; bound back read-only
            # where it is under /tmp
            "keep": [str(self.codestore.root)],
            "uid": tenant.uid,
            "gid": tenant.gid,
            "cgroup_procs": self.cgroups.procs_files(tenant_name),
            "rlimits": {"core": 0, "nofile": self.settings.worker_nofile},
            "sandbox": sandboxed,
            "immortalize": self.settings.immortalize,
            # the functions forked from it share its /tmp: the largest any of them asked for
            "tmp_size": max((s.limits.tmp_size for s in group), default=FunctionLimits.tmp_size),
            "packages": None
            if packages is None
            else [str(self.packages.path(name)) for name in packages],
        }

    def _snapshot_spec(self, spec: FunctionSpec) -> dict[str, Any]:
        """What the snapshot needs to confine itself and load the function (see zygote)."""
        tenant = self.tenants.get(spec.tenant)
        # With uids to give, each snapshot gets a sandbox of its own (see zygote): its /tmp
        # is a private tmpfs. Without (not root), everything runs as one user anyway and the
        # tenant's temp dir is a directory of the state dir.
        sandboxed = tenant.uid is not None
        self.codestore.grant(Path(spec.target.root), spec.tenant)
        env = default_env(spec.name, "/tmp" if sandboxed else str(tenant.tmpdir))
        memory = self.effective_tenant_limits(spec.tenant).memory_max
        if memory:
            env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] = str(memory >> 20)
        env.update(spec.env)
        return {
            "function": spec.name,
            "version": spec.version,
            "target": dataclasses.asdict(spec.target),
            "kind": spec.kind,
            "env": env,
            "cwd": spec.target.root,
            "source_root": spec.source_root,
            "uid": tenant.uid,
            "gid": tenant.gid,
            "cgroup_procs": self.cgroups.procs_files(spec.tenant),
            "rlimits": {"core": 0, "nofile": self.settings.worker_nofile},
            "concurrency": spec.limits.concurrency,
            "warmup": list(spec.warmup),
            "sandbox": sandboxed,
            "immortalize": self.settings.immortalize,
            "tmp_size": spec.limits.tmp_size,
            "packages": None
            if spec.packages is None
            else [str(self.packages.path(name)) for name in spec.packages],
        }

    # ------------------------------------------------------------------ requests

    async def invoke_event(self, spec: FunctionSpec, event: bytes) -> Response:
        """A direct invocation (Lambda's Invoke API): ``event`` is JSON, given to a handler
        exactly as it is; the answer's body is the function's JSON payload, and a function
        error is flagged with ``x-amz-function-error`` (see hourai.isolate.direct)."""
        request = Request(
            "POST",
            "/",
            "/",
            "",
            [("content-type", "application/json"), ("host", "localhost")],
            event,
            "1.1",
            ("127.0.0.1", 0),
            ("", 0),
            False,
        )
        return await self.invoke(spec, request, "", "/", event=event)

    async def invoke(
        self,
        spec: FunctionSpec,
        request: Request,
        root_path: str,
        path: str,
        timeout: float | None = None,
        *,
        event: bytes | None = None,
        traceparent: str | None = None,
        delivery: Delivery | None = None,
        stream: bool = False,
    ) -> Response:
        """Run one request. ``traceparent`` places its trace when it did not come with one
        in its headers; ``delivery`` makes it no HTTP request but the delivery of queued
        events, traced as their consumer (hourai.tracing says how). With ``stream``, a
        response the function streams comes back as soon as its head does, with a
        :class:`WorkerStream` for the rest (which the caller must attach or cancel); without,
        the function's stream is buffered whole. Cancelling the call gives the request up
        (see :meth:`submit`)."""
        return await self.submit(
            spec,
            request,
            root_path,
            path,
            timeout,
            event=event,
            traceparent=traceparent,
            delivery=delivery,
            stream=stream,
        )

    def submit(
        self,
        spec: FunctionSpec,
        request: Request,
        root_path: str,
        path: str,
        timeout: float | None = None,
        *,
        event: bytes | None = None,
        traceparent: str | None = None,
        delivery: Delivery | None = None,
        stream: bool = False,
    ) -> asyncio.Future[Response]:
        """:meth:`invoke` without a coroutine: the future of the answer, for the ingress to
        wait on without a task per request. Cancelling the future gives the request up:
        it leaves the queue, or its worker finishes it and the answer is thrown away."""
        rid = next(self._rids)
        loop = self.loop
        future: asyncio.Future[Response] = loop.create_future()
        pending = Pending(rid, spec, request, root_path, path, future, loop.time())
        pending.timeout = timeout
        pending.event = event
        if self.tracer is not None:
            if delivery is None:
                pending.trace = self.tracer.request(
                    f"{request.method} {spec.name}",
                    request.headers,
                    {
                        "faas.name": spec.name,
                        "faas.version": spec.version,
                        "http.request.method": request.method,
                        "url.path": request.path,
                    },
                    traceparent=traceparent,
                )
            else:
                pending.trace = self.tracer.request(
                    f"process {spec.name}",
                    (),
                    {"faas.name": spec.name, "faas.version": spec.version, **delivery.attributes},
                    links=delivery.links,
                    kind="consumer",
                )
        pending.streamable = stream and event is None
        if self.resources is not None:
            now = loop.time()
            if (spec.name, spec.version) not in self.versions:
                # The snapshot has to be rebuilt: only if the memory budget allows it.
                admission = self.resources.admit(spec.name, now)
                if not admission.ok:
                    future.set_result(
                        error_response(
                            503, f"{spec.name}: {admission.reason}", [("retry-after", "5")]
                        )
                    )
                    return future
            self.resources.request_started(spec.name, now)
        self.pending[rid] = pending
        pending.gave_up = partial(self._gave_up, pending)
        future.add_done_callback(pending.gave_up)
        if not (self.debugger.sessions and self.debugger.take(pending)):
            self._apply(self.scheduler.submit(rid, spec.name, timeout))
        return future

    def _gave_up(self, pending: Pending, future: asyncio.Future[Response]) -> None:
        # The client went away: drop it from the queue, or let its worker finish and
        # throw the result away. Nothing else is spent on it.
        if future.cancelled() and self.pending.pop(pending.rid, None) is not None:
            self._request_ended(pending)
            self._apply(self.scheduler.cancel(pending.rid))

    def _request_ended(self, pending: Pending) -> None:
        if self.resources is not None:
            self.resources.request_ended(pending.spec.name, self.loop.time())

    def _answer(self, pending: Pending, response: Response) -> None:
        if pending.stream is not None:
            # Its head is on its way to the client: an error now can only cut the body off.
            text = response.body.decode("utf-8", "replace").strip()
            self._end_stream(pending, f"{response.status} {text}")
            return
        future = pending.future
        if not future.done():
            if pending.gave_up is not None:
                future.remove_done_callback(pending.gave_up)
            future.set_result(response)
        if pending.trace is not None:
            self._trace_done(pending, response)
        self._record(pending, response.status)

    def _record(self, pending: Pending, status: int) -> None:
        """The request is over (a stream: at its end): free it, log it, count it."""
        if self.pending.pop(pending.rid, None) is not None:
            self._request_ended(pending)
        if self._refills:
            self.loop.call_soon(self._flush_refills)
        if self.observers:
            seconds = time.perf_counter() - pending.t0
            for observer in self.observers:
                observer.request_done(pending.spec.name, status, pending.start, seconds)
        if access_log.isEnabledFor(logging.INFO):
            req = pending.request
            access_log.info(
                "%s %s %s %d %s %.2fms",
                pending.spec.name,
                req.method,
                req.target,
                status,
                pending.start,
                (time.perf_counter() - pending.t0) * 1e3,
            )

    def _trace_done(self, pending: Pending, response: Response) -> None:
        assert pending.trace is not None
        error_id = None
        # A direct invocation's function error is a 200 (Lambda's way), with its error id.
        if response.status >= 500 or pending.event is not None:
            error_id = next((v for k, v in response.headers if k == "x-hourai-error-id"), None)
        pending.trace.done(response.status, pending.start, error_id)
        pending.trace = None

    def _trace_dispatch(self, pending: Pending, worker: WorkerProc, request_id: str) -> str:
        """The spans of the wait and the start path; the traceparent the function sees."""
        assert pending.trace is not None
        fork = build = None
        if not worker.served and pending.start in ("fork", "cold"):
            fork = worker.fork_ns
            if pending.start == "cold":
                version = self.versions.get((worker.function, worker.version))
                if version is not None and version.build_ns[1]:
                    build = version.build_ns
        return pending.trace.dispatched(
            pending.start, worker.pid, request_id, fork=fork, build=build
        )

    def _send_invocation(self, pending: Pending, worker: WorkerProc) -> None:
        req = pending.request
        spec = pending.spec
        remaining = (pending.timeout or spec.limits.timeout) - (self.loop.time() - pending.started)
        assert worker.channel is not None
        worker.inflight[pending.rid] = pending
        # New limits apply to warm workers too: the answer is bounded by today's option.
        worker.channel.max_frame = response_frame_limit(spec.limits.max_response_size)
        request_id = f"{pending.rid:x}-{worker.pid}"
        inv: dict[str, Any] = {
            "t": "inv",
            "id": pending.rid,
            "method": req.method,
            "path": pending.path,
            "root_path": pending.root_path,
            "query": req.query,
            "headers": req.headers,
            "body": req.body,
            "client": req.client,
            "server": req.server,
            "scheme": "http",
            "http_version": req.http_version,
            "request_id": request_id,
            "function": spec.name,
            "deadline_ms": int(max(remaining, 0) * 1000),
        }
        if pending.event is not None:
            inv["event"] = pending.event
        if pending.trace is not None:
            traceparent = self._trace_dispatch(pending, worker, request_id)
            # The function's parent is hourai's invocation span, not the caller's span.
            headers = [h for h in req.headers if h[0] != "traceparent"]
            headers.append(("traceparent", traceparent))
            inv["headers"] = headers
            inv["trace"] = traceparent
        if pending.streamable:
            # the largest chunk frame the worker may send, as the caller takes a stream
            inv["stream"] = min(STREAM_CHUNK, spec.limits.max_response_size)
        worker.served = True
        worker.channel.send(inv)

    # ------------------------------------------------------------------ workers

    def _worker_forked(self, version: Version, wid: int, pid: int, sock: Any, out_fd: int) -> None:
        worker = self.workers.get(wid)
        if worker is None:  # forked for a request that no longer wants it (removed, stopped)
            sock.close()
            os.close(out_fd)
            kill_pid(pid)
            return
        worker.pid = pid
        worker.fork_ns = (worker.fork_ns[0], time.time_ns())
        worker.output = OutputReader(
            self.loop, out_fd, f"{worker.function}#{pid}", self._function_output
        )
        worker.channel = self._worker_channel(worker, version.spec, sock)
        version.workers_by_pid[pid] = worker
        if self.resources is not None:
            self.resources.worker_started(worker.function, pid)
        if wid < 0:  # a debug session's, unknown to the scheduler (hourai.debug)
            self.debugger.forked(worker)
            return
        self._apply(self.scheduler.worker_ready(wid))

    def _worker_channel(self, worker: WorkerProc, spec: FunctionSpec, sock: Any) -> AsyncChannel:
        """The daemon's end of a worker channel: bounded by the function's response size, so
        an oversized answer is refused from its length prefix, before its body is read."""
        return AsyncChannel(
            self.loop,
            sock,
            lambda msg, _fds: self._worker_message(worker, msg),
            lambda reason: self._worker_channel_lost(worker, reason),
            max_frame=response_frame_limit(spec.limits.max_response_size),
        )

    def _worker_message(self, worker: WorkerProc, msg: dict[str, Any]) -> None:
        """A frame from a worker. Tenant code can write on the channel, so nothing in it is
        used before it is checked; a Violation raised here closes the channel, and
        _worker_channel_lost kills the worker and says why."""
        if worker.wid < 0 and self.debugger.message(worker, msg):
            return  # a debug worker's own report (checked by the debugger)
        spec = self.functions.get(worker.function)
        limit = spec.limits.max_response_size if spec is not None else DEFAULT_MAX_RESPONSE
        check_worker_reply(msg, limit)
        if msg["t"] == "imported":  # lazy imports seen in its first invocations
            if worker.wid > 0:  # (a debug session's worker imported the debugger)
                self.tree.learn(worker.function, msg["modules"])
            return
        if msg["t"] == "chunk":
            self._stream_chunk(worker, msg)
            return
        pending = worker.inflight.pop(msg["id"], None)
        if pending is None:
            # Every way a request leaves a worker without its answer (timeout, death,
            # removal) kills that worker, and a cancelled request stays in flight until
            # answered: an id not in flight was never asked for.
            raise Violation(f"answer to request {msg['id']}, which it was not running")
        if self.scheduler.sent_ahead(worker.wid) == pending.rid:
            # One at a time: what was sent ahead starts only after the answer before it.
            worker.inflight[pending.rid] = pending  # re-dispatched, not answered 502
            raise Violation(f"answer to request {pending.rid} before the one it was running")
        spec = pending.spec
        if pending.stream is not None or ("more" in msg and not pending.streamable):
            worker.inflight[pending.rid] = pending  # the violation's 502 (or cut-off) is its end
            if msg["t"] == "res":
                what = "already streaming" if pending.stream else "not allowed to stream"
                raise Violation(f"res frame for request {pending.rid}, {what}")
            del worker.inflight[pending.rid]
            self._log_error(worker, pending, msg)
            self._end_stream(pending, f"function {spec.name} raised {msg['error'][:200]}")
            self._apply(self.scheduler.finished(worker.wid, pending.rid))
            return
        if msg["t"] == "res":
            headers = msg["headers"]
            headers.append(("x-hourai-start", pending.start))
            if "more" in msg:
                worker.inflight[pending.rid] = pending  # busy until the stream's last chunk
                self._start_stream(worker, pending, Response(msg["status"], headers, msg["body"]))
                return
            response = Response(msg["status"], headers, msg["body"])
        else:
            self._log_error(worker, pending, msg)
            what = msg["error"][:500] if self.settings.show_errors else "an exception"
            response = error_response(
                500,
                f"function {spec.name} raised {what} (error id {msg['error_id']}; the "
                f"traceback is in hourai logs {spec.name})",
                [
                    ("x-hourai-start", pending.start),
                    ("x-hourai-error-id", msg["error_id"]),
                ],
            )
        self._answer(pending, response)
        if worker.wid < 0:
            self.debugger.finished(worker)
            return
        self._apply(self.scheduler.finished(worker.wid, pending.rid))

    def _log_error(self, worker: WorkerProc, pending: Pending, msg: dict[str, Any]) -> None:
        # The ids as fields too: a JSON log finds the failure from any of them.
        ids = {"request_id": f"{pending.rid:x}-{worker.pid}", "error_id": msg["error_id"]}
        if pending.trace is not None:
            ids["trace_id"] = pending.trace.trace_id_hex
        log.error(
            "%s#%d request %s raised %s (error id %s)",
            pending.spec.name,
            worker.pid,
            pending.rid,
            msg["error"][:500],
            msg["error_id"],
            extra=ids,
        )

    # ------------------------------------------------------------------ streams

    def _start_stream(self, worker: WorkerProc, pending: Pending, head: Response) -> None:
        assert worker.channel is not None
        spec = pending.spec
        stream = WorkerStream(
            worker.channel,
            exclusive=spec.limits.concurrency == 1,
            max_held=spec.limits.max_response_size,
            on_cancel=lambda reason: self._stream_cancelled(worker, pending, reason),
        )
        pending.stream = stream
        pending.status = head.status
        head.stream = stream
        future = pending.future
        if future.done():  # the client left before the head came
            stream.cancel()
        else:
            if pending.gave_up is not None:
                future.remove_done_callback(pending.gave_up)
            future.set_result(head)

    def _stream_chunk(self, worker: WorkerProc, msg: dict[str, Any]) -> None:
        pending = worker.inflight.get(msg["id"])
        if pending is None or pending.stream is None:
            raise Violation(f"chunk frame for request {msg['id']}, which is not streaming")
        pending.stream.push(msg["body"])
        if not msg["more"]:
            del worker.inflight[pending.rid]
            self._end_stream(pending, "")
            self._apply(self.scheduler.finished(worker.wid, pending.rid))

    def _end_stream(self, pending: Pending, failure: str) -> None:
        stream = pending.stream
        assert stream is not None
        if stream.ended is not None:
            return
        if failure and not stream.cancelled:
            name = pending.spec.name
            log.warning("%s request %s: stream cut off: %s", name, pending.rid, failure)
        stream.finish(failure)
        self._record(pending, pending.status)

    def _stream_cancelled(self, worker: WorkerProc, pending: Pending, reason: str) -> None:
        """The client of a stream went away (or, ``reason``, fell too far behind): tell the
        worker, and replace it if it does not end the stream soon."""
        if reason:
            log.warning("%s request %s: stream dropped: %s", worker.function, pending.rid, reason)
            self._verdict(worker.function, f"request {pending.rid}: stream dropped: {reason}")
        if worker.killed or worker.channel is None or pending.rid not in worker.inflight:
            return
        worker.channel.send({"t": "cancel", "id": pending.rid})

        def overdue() -> None:
            if not worker.killed and worker.inflight.get(pending.rid) is pending:
                self._kill_and_replace(
                    worker,
                    f"it did not end request {pending.rid}'s stream within {CANCEL_GRACE:g} s "
                    "of its client leaving",
                )

        self.loop.call_later(CANCEL_GRACE, overdue)

    def _kill_and_replace(self, worker: WorkerProc, why: str) -> None:
        worker.killed = True
        if worker.pid:
            kill_pid(worker.pid)
        log.warning("%s#%d killed: %s", worker.function, worker.pid, why)
        self._verdict(worker.function, f"worker {worker.pid} killed: {why}")
        for pending in self._started_on(worker):
            self._answer(
                pending,
                error_response(
                    502,
                    f"function {worker.function}: worker killed: {why}",
                    [("x-hourai-start", pending.start)],
                ),
            )
        worker.inflight.clear()
        if worker.channel is not None:
            worker.channel.close("killed")
        self._forget_worker(worker)
        self._apply(self.scheduler.worker_died(worker.wid, f"killed: {why}", killed=True))

    def _started_on(self, worker: WorkerProc) -> list[Pending]:
        """What the worker held, less the request sent ahead that it had not started: the
        scheduler dispatches that one again when told the worker is gone."""
        ahead = self.scheduler.sent_ahead(worker.wid)
        return [p for rid, p in worker.inflight.items() if rid != ahead]

    def _worker_channel_lost(self, worker: WorkerProc, reason: str) -> None:
        channel = worker.channel
        error = channel.error if channel is not None else None
        if error is None or worker.killed:
            self._worker_channel_closed(worker, reason)
        else:
            self._worker_broke_protocol(worker, error)

    def _worker_broke_protocol(self, worker: WorkerProc, error: ProtocolError) -> None:
        """Kill the worker; what it held gets a 502 that names the violation."""
        if isinstance(error, FrameTooLarge):
            # Only a response may be this large: say it in the terms of the option.
            error = ResponseTooLarge(error.size, error.limit - RESPONSE_OVERHEAD, framed=True)
        if isinstance(error, ResponseTooLarge):
            status_text = f"function {worker.function}: {error}; refused unread"
        else:
            status_text = f"function {worker.function}'s worker broke the channel protocol: {error}"
        worker.killed = True
        if worker.pid:
            kill_pid(worker.pid)
        verdict = f"worker {worker.pid} killed: {error}"
        log.warning("%s#%d killed: %s", worker.function, worker.pid, error)
        self._verdict(worker.function, verdict)
        for pending in self._started_on(worker):
            self._answer(
                pending, error_response(502, status_text, [("x-hourai-start", pending.start)])
            )
        worker.inflight.clear()
        self._forget_worker(worker)
        self._apply(self.scheduler.worker_died(worker.wid, f"killed: {error}"))

    def _worker_channel_closed(self, worker: WorkerProc, reason: str) -> None:
        if worker.killed:
            self._forget_worker(worker)
            return
        if worker.exit is not None:
            self._worker_died(worker)
        else:
            # Usually the snapshot's "exited" is a moment behind: wait for it, not forever.
            self.loop.call_later(_EXIT_STATUS_GRACE, self._worker_died, worker)

    def _worker_exited(self, wid: int, status: ExitStatus) -> None:
        worker = self.workers.get(wid)
        if worker is None:
            return
        worker.exit = status
        if worker.channel is not None and worker.channel.paused:
            worker.channel.resume_reading()  # read its last frames and its EOF
        if worker.channel is not None and worker.channel.closed and not worker.killed:
            self._worker_died(worker)

    def _worker_died(self, worker: WorkerProc) -> None:
        if worker.wid not in self.workers or worker.killed:
            return
        worker.killed = True
        reason = self.death_reason(worker)
        log.warning("%s#%d %s", worker.function, worker.pid, reason)
        self._verdict(worker.function, f"worker {worker.pid}: {reason}")
        self._forget_worker(worker)
        if worker.wid < 0:
            self.debugger.worker_gone(worker)
            return
        # An OOM kill is the invocation's doing, not a function that cannot start.
        oom = self._oom_killed(worker)
        self._apply(self.scheduler.worker_died(worker.wid, reason, oom=oom))

    def _oom_killed(self, worker: WorkerProc) -> bool:
        spec = self.functions.get(worker.function)
        return (
            spec is not None
            and worker.exit is not None
            and worker.exit.signal == signal.SIGKILL
            and self.cgroups.oom_killed_since(spec.tenant, worker.oom_mark)
        )

    def death_reason(self, worker: WorkerProc) -> str:
        spec = self.functions.get(worker.function)
        if spec is not None and self._oom_killed(worker):
            limit = self.effective_tenant_limits(spec.tenant).memory_max
            what = f"{format_size(limit)} memory limit" if limit else "memory limit"
            return (
                f"worker of {worker.function} was killed by the kernel's OOM killer: "
                f"tenant {spec.tenant} exceeded its {what}"
            )
        what = worker.exit.describe() if worker.exit else "closed its channel"
        return f"worker of {worker.function} {what}"

    def _forget_worker(self, worker: WorkerProc) -> None:
        self.workers.pop(worker.wid, None)
        version = self.versions.get((worker.function, worker.version))
        if version is not None:
            version.workers_by_pid.pop(worker.pid, None)
        if worker.output is not None and worker.output.fd >= 0:
            # Leave the pipe to drain the last lines; it closes itself at EOF.
            pass

    def _kill_worker(self, worker: WorkerProc, reason: str) -> None:
        worker.killed = True
        if worker.pid:
            kill_pid(worker.pid)
        if worker.channel is not None:
            worker.channel.close(reason)
        else:
            self._forget_worker(worker)

    def _function_output(self, tag: str, line: str) -> None:
        """One line a function printed (already held to its output budget by the reader).
        A worker marks the lines of an invocation with its request id (and trace id): that
        goes into the tag and the JSON log's fields. The line goes to the function's own log;
        the daemon's log gets a copy only when nothing keeps function logs (`hourai run`,
        where the terminal is the function's log)."""
        extra = None
        if line.startswith("\x1f"):
            marked = _LINE_MARK.match(line)
            if marked is not None:
                request_id, trace_id = marked.groups()
                line = line[marked.end() :]
                tag = f"{tag} req={request_id}" + (f" trace={trace_id}" if trace_id else "")
                extra = {"request_id": request_id, "trace_id": trace_id}
        kept = False
        function = function_of(tag)
        for observer in self.observers:
            observer.function_output(function, tag, line)
            kept = kept or observer.keeps_function_output
        if not kept:
            function_log.info("[%s] %s", tag, line, extra=extra)

    def _verdict(self, function: str, message: str) -> None:
        for observer in self.observers:
            observer.function_verdict(function, message)

    # ------------------------------------------------------------------ decisions

    def _flush_refills(self) -> None:
        if self._refill_timer is not None:
            self._refill_timer.cancel()
            self._refill_timer = None
        refills, self._refills = self._refills, []
        for handle, wid, spare in refills:
            self._fork(handle, wid, spare)

    def _fork(self, handle: SnapshotHandle, wid: int, spare: bool) -> None:
        worker = self.workers.get(wid)
        if worker is not None:
            # Before the fork is asked for: a later count above it means the kernel's OOM
            # killer took one of the tenant's processes while this worker lived.
            worker.oom_mark = self.cgroups.oom_kill_count(worker.tenant)
        handle.fork(wid, spare=spare)

    def _apply(self, decisions: list[Decision]) -> None:
        dispatched = False
        for d in decisions:
            if isinstance(d, Dispatch):
                dispatched = True
                pending = self.pending.get(d.request_id)
                worker = self.workers.get(d.worker_id)
                if pending is None or worker is None or worker.channel is None:
                    log.error("scheduler dispatched %s to %s: unknown", d.request_id, d.worker_id)
                    continue
                pending.start = d.start
                pending.wid = d.worker_id
                self._send_invocation(pending, worker)
            elif isinstance(d, Reject):
                pending = self.pending.get(d.request_id)
                if pending is not None:
                    headers = []
                    if d.retry_after is not None:
                        headers.append(("retry-after", str(max(1, round(d.retry_after)))))
                    self._answer(pending, error_response(d.status, d.reason, headers))
            elif isinstance(d, Fail):
                pending = self.pending.get(d.request_id)
                if pending is not None:
                    if pending.wid is not None and pending.wid in self.workers:
                        self.workers[pending.wid].inflight.pop(pending.rid, None)
                    if d.status == 504:
                        self._verdict(pending.spec.name, f"request {d.request_id}: {d.reason}")
                    self._answer(
                        pending,
                        error_response(d.status, d.reason, [("x-hourai-start", pending.start)]),
                    )
            elif isinstance(d, Fork):
                version = self.versions.get((d.function, d.version))
                worker = WorkerProc(d.worker_id, d.function, d.version)
                worker.fork_ns = (time.time_ns(), 0)
                self.workers[d.worker_id] = worker
                if version is None or version.handle is None:
                    self.loop.call_soon(self._fork_failed, d.worker_id, "snapshot is gone")
                    continue
                worker.tenant = version.spec.tenant
                if dispatched:
                    # A fork that follows a dispatch refills the spare it used: let the
                    # request run first (on 2 cores a concurrent fork doubles its latency),
                    # and its invocation leave in this turn's write, before the fork's
                    # bookkeeping (the OOM mark is a cgroup file read).
                    self._refills.append((version.handle, d.worker_id, d.spare))
                    if self._refill_timer is None:
                        self._refill_timer = self.loop.call_later(REFILL_DELAY, self._flush_refills)
                else:
                    self._fork(version.handle, d.worker_id, d.spare)
            elif isinstance(d, Kill):
                worker = self.workers.get(d.worker_id)
                if worker is not None:
                    self._kill_worker(worker, d.reason)
            elif isinstance(d, BuildSnapshot):
                self._build(d.function, d.version)
            elif isinstance(d, DropSnapshot):
                version = self.versions.pop((d.function, d.version), None)
                if version is not None and version.handle is not None:
                    version.handle.stop()
                    (version.handle.parent or self.zygote).forget(version.handle.fid)
                if self.resources is not None and not any(
                    f == d.function for f, _ in self.versions
                ):
                    self.resources.snapshot_dropped(d.function, self.loop.time())
            elif isinstance(d, FunctionState):
                log.info("%s: %s %s", d.function, d.state, d.detail)
                for observer in self.observers:
                    observer.function_state(d)
        self._arm_timer()

    def _fork_failed(self, wid: int, error: str) -> None:
        log.warning("fork of worker %d failed: %s", wid, error)
        self.workers.pop(wid, None)
        if wid < 0:
            self.debugger.fork_failed(wid, error)
            return
        self._apply(self.scheduler.fork_failed(wid, error))

    def _arm_timer(self) -> None:
        pushes = self.scheduler.timer_pushes
        if self._timer is not None and pushes == self._timer_pushes:
            return  # nothing new in the scheduler's heap: the armed timer is early enough
        self._timer_pushes = pushes
        deadline = self.scheduler.next_deadline()
        if deadline is None or (self._timer_at is not None and self._timer_at <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._apply(self.scheduler.tick())


class Router:
    """Which function a request is for, and the path it sees.

    ``single``: one function mounted at ``/`` (``hourai run``). Otherwise by
    ``Host: <function>.<domain>`` when a domain is configured, else by the first path
    segment, ``/<function>/rest`` (the function sees ``/rest`` with root path ``/<function>``).
    """

    def __init__(
        self,
        functions: dict[str, FunctionSpec],
        *,
        single: str | None = None,
        domain: str | None = None,
    ) -> None:
        self.functions = functions
        self.single = single
        self.domain = ("." + domain.strip(".").lower()) if domain else None

    def route(self, request: Request) -> tuple[FunctionSpec, str, str] | None:
        if self.single is not None:
            spec = self.functions.get(self.single)
            return (spec, "", request.path or "/") if spec else None
        if self.domain is not None:
            host = (request.header("host") or "").rsplit(":", 1)[0].lower()
            if host.endswith(self.domain):
                spec = self.functions.get(host[: -len(self.domain)])
                if spec is not None:
                    return spec, "", request.path or "/"
        path = request.path
        name, sep, rest = path[1:].partition("/")
        spec = self.functions.get(name)
        if spec is None:
            return None
        return spec, "/" + name, "/" + rest if sep else "/"


# Asynchronous invocation over HTTP: either header, with Lambda's value for it.
INVOCATION_TYPE_HEADERS = ("x-hourai-invocation-type", "x-amz-invocation-type")
# (function, event, source, traceparent) -> id, once durable
AcceptEvent = Callable[[str, bytes, str, str | None], Awaitable[str]]


async def accept_event(
    runtime: Runtime,
    accept: AcceptEvent,
    name: str,
    event: bytes,
    source: str,
    request: Request | None = None,
    traceparent: str | None = None,
) -> str:
    """Queue an event, traced when tracing is on: the HTTP ``request`` that queued it (if
    one did) and its ``publish`` span, whose context goes into the queue with the event
    (see hourai.tracing). The caller's context comes from the request's headers, else
    ``traceparent``. Raises what ``accept`` raises."""
    tracer = runtime.tracer
    if tracer is None:
        return await accept(name, event, source, None)
    if request is None:
        trace = tracer.accepting(name, traceparent=traceparent)
    else:
        trace = tracer.accepting(
            name,
            request.headers,
            request=f"{request.method} {name}",
            attributes={
                "faas.name": name,
                "http.request.method": request.method,
                "url.path": request.path,
            },
        )
    try:
        iid = await accept(name, event, source, trace.traceparent)
    except BaseException:
        trace.done(503, None)
        raise
    trace.done(202, iid)
    return iid


def _function_error(payload: bytes) -> str:
    """``errorType: errorMessage`` of Lambda's error payload (the payload itself if not)."""
    try:
        doc = json.loads(payload)
        return f"{doc['errorType']}: {doc['errorMessage']}"
    except (ValueError, KeyError, TypeError):
        return payload.decode("utf-8", "replace")[:2000]


def http_handler(
    runtime: Runtime, router: Router, accept: AcceptEvent | None = None
) -> Callable[[Request], Awaitable[Response]]:
    """The ingress callback: route, then hand the request to the scheduler — or, with an
    ``Event`` invocation type and a queue to ``accept`` it, to the durable queue (202).

    It returns the scheduler's future itself, not a coroutine: no task per request."""

    def handle(request: Request) -> Awaitable[Response]:
        routed = router.route(request)
        if routed is None:
            if router.single is not None:
                return _done(runtime, error_response(503, "the function is not deployed (yet)"))
            return _done(runtime, error_response(404, f"no function serves {request.path}"))
        spec, root_path, path = routed
        if accept is not None and any(
            (request.header(h) or "").lower() == "event" for h in INVOCATION_TYPE_HEADERS
        ):
            return _accept_async(runtime, accept, spec.name, request)
        return runtime.submit(spec, request, root_path, path, stream=True)

    return handle


def _done(runtime: Runtime, response: Response) -> asyncio.Future[Response]:
    future: asyncio.Future[Response] = runtime.loop.create_future()
    future.set_result(response)
    return future


async def _accept_async(
    runtime: Runtime, accept: AcceptEvent, name: str, request: Request
) -> Response:
    """The body is the event (as with Lambda's Invoke API); answered once it is durable."""
    try:
        iid = await accept_event(
            runtime, accept, name, bytes(request.body) or b"{}", "http", request
        )
    except Exception as exc:
        log.error("%s: could not queue an async invocation: %s", name, exc)
        return error_response(503, f"the async invocation could not be stored: {exc}")
    body = json.dumps({"invocationId": iid, "status": "queued"}).encode() + b"\n"
    return Response(
        202,
        [
            ("content-type", "application/json"),
            ("x-hourai-invocation-id", iid),
            ("x-amz-request-id", iid),
        ],
        body,
    )


def event_invoker(runtime: Runtime) -> InvokeEvent:
    """The seam the async runner, schedules and triggers invoke functions through.

    A handler is invoked directly, with the event exactly as given (Lambda's semantics:
    what an async caller, EventBridge or an event source mapping hands a Lambda function);
    its payload is the result, and a function error (``x-amz-function-error``) a failure.
    An ASGI or WSGI app can only answer HTTP: it gets ``POST /`` with the event as its JSON
    body, and an error status is a failure."""
    kinds: dict[str, str] = {}  # detected at build; kept while an evicted snapshot is away

    def kind_of(spec: FunctionSpec) -> str | None:
        version = runtime.versions.get((spec.name, spec.version))
        built = version.built if version is not None else None
        if built is not None and built.done() and not built.cancelled() and not built.exception():
            kinds[spec.name] = str(built.result().get("kind"))
        return kinds.get(spec.name) or spec.kind

    async def invoke_event(
        name: str, event: bytes, timeout: float | None, delivery: Delivery | None = None
    ) -> Outcome:
        spec = runtime.functions.get(name)
        if spec is None:
            return Outcome(404, b"", f"function {name} is not deployed", throttled=True)
        headers = [("content-type", "application/json"), ("host", "localhost")]
        request = Request(
            "POST", "/", "/", "", headers, event, "1.1", ("127.0.0.1", 0), ("", 0), False
        )
        direct = kind_of(spec) == "handler"
        response = await runtime.invoke(
            spec, request, "", "/", timeout, event=event if direct else None, delivery=delivery
        )
        body = bytes(response.body)
        ran = any(k == "x-hourai-start" for k, _ in response.headers)
        if response.status in (429, 503) and not ran:
            # refused by the scheduler (rate limit, full queue, backoff): nothing ran
            return Outcome(response.status, body, body.decode("utf-8", "replace").strip(), True)
        if response.status >= 400:
            what = body.decode("utf-8", "replace").strip()[:2000] or f"status {response.status}"
            return Outcome(response.status, body, what)
        if any(k == "x-amz-function-error" for k, _ in response.headers):
            return Outcome(response.status, body, _function_error(body))
        return Outcome(response.status, body)

    return invoke_event
