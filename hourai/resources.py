"""The adaptive policy, live: measurements in, its decisions carried out.

:class:`hourai.scheduler.policy.AdaptivePolicy` is pure; this is its I/O shell in the
daemon. It feeds the policy what it cannot see for itself — invocations and idle periods
(from the request path, O(1)), snapshot rebuild times, unique memory (USS) of snapshots and
workers, host and per-tenant memory from the cgroups — and every second carries out what
``decide`` returns: unload or pre-warm snapshots, evict idle workers, resize tenants'
``memory.high`` and cpu weight. All of it runs off the request path except the two O(1)
calls and :meth:`admit`, which only runs for a request that needs a snapshot rebuilt.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

import psutil

from hourai.cgroup import CgroupError, TenantLimits
from hourai.fsutil import atomic_write
from hourai.scheduler.policy import (
    AdaptivePolicy,
    Admission,
    EvictWorkers,
    PolicyParams,
    PrewarmSnapshot,
    SetTenantCpuWeight,
    SetTenantMemoryHigh,
    TenantUsage,
    UnloadSnapshot,
)

if TYPE_CHECKING:
    from hourai.daemon import Runtime

log = logging.getLogger("hourai.policy")

DECIDE_INTERVAL = 1.0
SAVE_INTERVAL = 60.0
# USS reads walk /proc/PID/smaps_rollup: measure a few processes per tick, not all of them.
MEASURE_PER_TICK = 8


class ResourceManager:
    def __init__(self, runtime: Runtime, params: PolicyParams) -> None:
        self.runtime = runtime
        self.policy = AdaptivePolicy(params)
        self.inflight: Counter[str] = Counter()
        self.counts: Counter[tuple[str, str]] = Counter()  # (function, action) -> times
        self._measure_queue: list[tuple[str, int, str]] = []  # (function, pid, "snapshot"|"worker")
        self._costs: dict[str, dict[str, float]] = {}
        self._unloading: set[str] = set()
        self._path = runtime.state_dir / "policy.json"
        self._saved = self._load()

    # ------------------------------------------------------------- request path (O(1))

    def request_started(self, function: str, now: float) -> None:
        self.inflight[function] += 1
        self.policy.on_invocation(function, now)

    def request_ended(self, function: str, now: float) -> None:
        left = self.inflight[function] - 1
        if left <= 0:
            del self.inflight[function]
            self.policy.on_idle(function, now)
        else:
            self.inflight[function] = left

    def admit(self, function: str, now: float) -> Admission:
        """May the function's snapshot be rebuilt now? Evicts to make room if it must."""
        costs = self._costs.get(function, {})
        needed = int(costs.get("snapshot_bytes", self.policy.params.default_snapshot_bytes))
        needed += int(costs.get("worker_bytes", self.policy.params.default_worker_bytes))
        admission = self.policy.admit(function, needed, now)
        for d in admission.evictions:
            self._carry_out(d)
        return admission

    # ------------------------------------------------------------- life-cycle events

    def register(self, function: str, tenant: str) -> None:
        """Know the function, keeping what was learned of it: across redeploys (in memory)
        and across restarts (``policy.json`` in the state dir)."""
        if function in self.policy.functions():
            state: dict[str, Any] | None = self.policy.export_state(function)
        else:
            state = self._saved.get(function)
        try:
            self.policy.register(function, tenant, state)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("%s: saved policy state unusable (%s); learning afresh", function, exc)
            self.policy.register(function, tenant)

    def save(self) -> None:
        """Persist every function's learned history (small: a few KiB each)."""
        doc = {
            fn: self.policy.export_state(fn)
            for fn in self.runtime.functions
            if fn in self.policy.functions()
        }
        atomic_write(self._path, json.dumps(doc).encode(), mode=0o600)
        self._saved = doc

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            doc = json.loads(self._path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # Only learned statistics: losing them costs cold starts, not functions.
            log.warning("%s unreadable (%s): the policy starts learning afresh", self._path, exc)
            return {}
        return doc if isinstance(doc, dict) else {}

    def forget(self, function: str) -> None:
        self.policy.forget(function)
        self._costs.pop(function, None)
        self.inflight.pop(function, None)

    def declare_tenant(self, tenant: str, limits: TenantLimits) -> None:
        self.policy.declare_tenant(tenant, limits.memory_max, limits.cpu_weight)

    def snapshot_built(self, function: str, rebuild_seconds: float, pid: int | None) -> None:
        self._costs.setdefault(function, {})["rebuild_s"] = rebuild_seconds
        if pid:
            self._measure_queue.append((function, pid, "snapshot"))

    def worker_started(self, function: str, pid: int) -> None:
        if not any(f == function and kind == "worker" for f, _, kind in self._measure_queue):
            self._measure_queue.append((function, pid, "worker"))

    def snapshot_dropped(self, function: str, now: float) -> None:
        """The function has no snapshot any more. Unless the policy itself decided it (then
        it knows), tell it, so its timers for that snapshot stop."""
        if function in self._unloading:
            self._unloading.discard(function)
        else:
            self.policy.on_unloaded(function, now)

    def export_state(self, function: str) -> dict[str, Any]:
        return self.policy.export_state(function)

    def measured(self, function: str) -> bool:
        """Whether the policy has the function's measured costs (not the defaults) yet."""
        costs = self._costs.get(function, {})
        return "snapshot_bytes" in costs and "rebuild_s" in costs

    def explain(self, function: str) -> dict[str, Any]:
        out = self.policy.explain(function)
        out["actions"] = {a: n for (f, a), n in self.counts.items() if f == function}
        return out

    # ------------------------------------------------------------- the periodic loop

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # Compressed time scales (tests, experiments) shrink the bins: decide at least once a bin.
        interval = min(DECIDE_INTERVAL, self.policy.params.bin_s)
        last_save = loop.time()
        while True:
            await asyncio.sleep(interval)
            if loop.time() - last_save > SAVE_INTERVAL:
                last_save = loop.time()
                try:
                    self.save()
                except OSError as exc:
                    log.warning("could not save the policy state: %s", exc)
            try:
                self._measure()
                for d in self.policy.decide(loop.time()):
                    self._carry_out(d)
            except Exception:  # a bad reading must not stop the policy for good
                log.exception("adaptive policy step failed")

    def _measure(self) -> None:
        batch, self._measure_queue = (
            self._measure_queue[:MEASURE_PER_TICK],
            self._measure_queue[MEASURE_PER_TICK:],
        )
        for function, pid, kind in batch:
            try:
                uss = psutil.Process(pid).memory_full_info().uss
            except (psutil.Error, OSError):
                continue
            costs = self._costs.setdefault(function, {})
            costs[f"{kind}_bytes"] = uss
            if "snapshot_bytes" in costs:
                self.policy.observe_cost(
                    function,
                    costs.get("rebuild_s", self.policy.params.default_rebuild_s),
                    int(costs["snapshot_bytes"]),
                    int(costs.get("worker_bytes", self.policy.params.default_worker_bytes)),
                )
        cgroups = self.runtime.cgroups
        tenants: dict[str, TenantUsage] = {}
        used = 0
        for tenant in {spec.tenant for spec in self.runtime.functions.values()}:
            try:
                usage = cgroups.usage(tenant)
            except (CgroupError, OSError):
                continue
            used += usage.memory_current
            tenants[tenant] = TenantUsage(usage.memory_current, usage.cpu_usec / 1e6)
        total = psutil.virtual_memory().total
        self.policy.observe_memory(
            asyncio.get_running_loop().time(), used, total_bytes=total, tenants=tenants
        )

    def _carry_out(self, d: Any) -> None:
        runtime = self.runtime
        if isinstance(d, UnloadSnapshot):
            if d.fn in runtime.functions:
                self._count(d.fn, "unloaded")
                self._unloading.add(d.fn)
                log.info("%s: snapshot released (%s)", d.fn, d.reason)
                runtime.unload(d.fn, d.reason)
        elif isinstance(d, PrewarmSnapshot):
            if d.fn in runtime.functions:
                self._count(d.fn, "prewarmed")
                log.info("%s: snapshot pre-warmed (%s)", d.fn, d.reason)
                runtime.prewarm(d.fn)
        elif isinstance(d, EvictWorkers):
            if d.fn in runtime.functions:
                self._count(d.fn, "workers_evicted")
                log.info("%s: %d idle workers evicted (%s)", d.fn, d.count, d.reason)
                runtime.evict_idle(d.fn, d.count, d.reason)
        elif isinstance(d, SetTenantMemoryHigh | SetTenantCpuWeight):
            declared = runtime.tenant_limits.get(d.tenant)
            if declared is None:
                return
            if isinstance(d, SetTenantMemoryHigh):
                sized = dataclasses.replace(declared, memory_high=d.memory_high)
            else:
                sized = dataclasses.replace(declared, cpu_weight=d.weight)
            runtime.tenant_limits[d.tenant] = sized
            try:
                runtime.cgroups.set_limits(d.tenant, sized)
            except CgroupError as exc:
                log.warning("could not resize tenant %s: %s", d.tenant, exc)

    def _count(self, function: str, action: str) -> None:
        self.counts[(function, action)] += 1
