"""Prometheus metrics, aggregated in the daemon and rendered by prometheus_client.

Counting on the request path is a few dict and list operations per request
(:meth:`Metrics.request_done`); everything else — workers by state, queues, rejections,
evictions, tenants' cgroup usage — is read from its owner (the scheduler, the policy, the
cgroups) only when /metrics is scraped, by a custom collector. There is one process and
one registry: no multiprocess files.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector

from hourai.cgroup import CgroupError
from hourai.daemon import Observer
from hourai.scheduler.core import FunctionState

if TYPE_CHECKING:
    from hourai.daemon import Runtime

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds. Warm requests take a few hundred microseconds, a fork about a millisecond, a
# true cold start tens of ms. Every bucket is a line per function in every scrape: few.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0)
_LE = [repr(b) if b < 1 else f"{b:.1f}" for b in BUCKETS] + ["+Inf"]
BUILD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
RECENT = 512  # latencies kept per function for exact percentiles in `hourai stats`
# Scrapes closer together than this get the same text: with many functions a render costs
# tens of milliseconds of the event loop, and two scrapers must not double it.
RENDER_REUSE = 1.0
WORKER_STATES = ("starting", "spare", "idle", "busy", "draining")


class _Histogram:
    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def buckets(self) -> list[tuple[str, int]]:
        les = _LE if self.bounds is BUCKETS else [str(b) for b in self.bounds] + ["+Inf"]
        total = 0
        out = []
        for le, n in zip(les, self.counts, strict=True):
            total += n
            out.append((le, total))
        return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


class _Collected:
    """Metric families already collected, in the shape generate_latest reads."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


class Metrics(Observer):
    """The daemon's metrics: an Observer of the runtime and a prometheus_client collector."""

    def __init__(self, runtime: Runtime, ready: Callable[[], bool] = lambda: True) -> None:
        self.runtime = runtime
        self.ready = ready
        self.started = time.time()
        self.requests: Counter[tuple[str, int, str]] = Counter()
        self.latency: dict[str, _Histogram] = {}
        self.cold: dict[str, _Histogram] = {}
        self.recent: dict[str, deque[float]] = {}
        self.state_changes: Counter[tuple[str, str]] = Counter()
        self.deploys: Counter[str] = Counter()
        self.builds = _Histogram(BUILD_BUCKETS)
        # Other owners' metrics (the async queue, schedules, triggers): read at scrape time.
        self.collectors: list[Callable[[], Iterable[Metric]]] = []
        self._rendering: asyncio.Future[bytes] | None = None
        self._rendered_at = 0.0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        ProcessCollector(registry=self.registry)

    # -- Observer (the request path: keep it cheap)

    def request_done(self, function: str, status: int, start: str, seconds: float) -> None:
        self.requests[(function, status, start)] += 1
        h = self.latency.get(function)
        if h is None:
            h = self.latency[function] = _Histogram()
            self.recent[function] = deque(maxlen=RECENT)
        h.observe(seconds)
        self.recent[function].append(seconds)
        if start in ("spare", "fork", "cold"):
            c = self.cold.get(start)
            if c is None:
                c = self.cold[start] = _Histogram()
            c.observe(seconds)

    def function_state(self, state: FunctionState) -> None:
        self.state_changes[(state.function, state.state)] += 1

    # -- from the service

    def deployed(self, result: str, build_seconds: float | None = None) -> None:
        """A deploy's outcome: ok, unchanged, refused, invalid."""
        self.deploys[result] += 1
        if build_seconds is not None:
            self.builds.observe(build_seconds)

    def forget(self, function: str) -> None:
        """Drop a removed function's series (a scrape must not list the dead forever)."""
        for key in [k for k in self.requests if k[0] == function]:
            del self.requests[key]
        for key in [k for k in self.state_changes if k[0] == function]:
            del self.state_changes[key]
        self.latency.pop(function, None)
        self.recent.pop(function, None)

    def summary(self, function: str) -> dict[str, Any]:
        """Requests by status class and latency percentiles (over the last 512 requests)."""
        by_status: Counter[str] = Counter()
        by_start: Counter[str] = Counter()
        for (fn, status, start), n in self.requests.items():
            if fn == function:
                by_status[f"{status // 100}xx"] += n
                by_start[start] += n
        recent = list(self.recent.get(function, ()))
        h = self.latency.get(function)
        return {
            "requests": sum(by_status.values()),
            "by_status": dict(by_status),
            "by_start": dict(by_start),
            "latency_ms": {
                f"p{q}": None if (v := percentile(recent, q)) is None else round(v * 1e3, 3)
                for q in (50, 90, 99)
            },
            "mean_ms": round(h.sum / h.count * 1e3, 3) if h and h.count else None,
        }

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def render_async(self) -> bytes:
        """The exposition text, formatted off the event loop, at most once a second.

        Reading the scheduler, the policy and the counters must happen on the loop (they
        change there); turning thousands of samples into text (about 30 us a line in
        prometheus_client) need not, and in a thread it stalls requests for a GIL switch
        interval at a time instead of the whole render. Scrapes that arrive while a render
        is under way, or within RENDER_REUSE of one, share it.
        """
        loop = asyncio.get_running_loop()
        if self._rendering is None or (
            self._rendering.done() and loop.time() - self._rendered_at > RENDER_REUSE
        ):
            families = list(self.registry.collect())
            self._rendered_at = loop.time()
            self._rendering = asyncio.ensure_future(
                asyncio.to_thread(generate_latest, _Collected(families))
            )
        return await asyncio.shield(self._rendering)

    # -- the collector (runs at scrape time)

    def collect(self) -> Iterator[Metric]:
        runtime = self.runtime
        scheduler = runtime.scheduler

        up = GaugeMetricFamily("hourai_ready", "1 once the daemon has restored its functions")
        up.add_metric([], 1.0 if self.ready() else 0.0)
        yield up
        start = GaugeMetricFamily("hourai_start_time_seconds", "when the daemon started")
        start.add_metric([], self.started)
        yield start

        requests = CounterMetricFamily(
            "hourai_requests",
            "requests answered, by function, HTTP status and how the worker started "
            "(warm, spare, fork, cold; none when no worker took it)",
            labels=["function", "status", "start"],
        )
        for (fn, status, how), n in self.requests.items():
            requests.add_metric([fn, str(status), "none" if how == "-" else how], n)
        yield requests

        latency = HistogramMetricFamily(
            "hourai_request_duration_seconds",
            "time from the request reaching the scheduler to its answer",
            labels=["function"],
        )
        for fn, h in self.latency.items():
            latency.add_metric([fn], h.buckets(), h.sum)
        yield latency

        cold = HistogramMetricFamily(
            "hourai_cold_start_duration_seconds",
            "latency of requests that did not find a warm worker, by start path (per "
            "function: hourai_requests_total by start)",
            labels=["start"],
        )
        for how, h in self.cold.items():
            cold.add_metric([how], h.buckets(), h.sum)
        yield cold

        builds = HistogramMetricFamily(
            "hourai_deploy_build_duration_seconds", "snapshot build time of successful deploys"
        )
        builds.add_metric([], self.builds.buckets(), self.builds.sum)
        yield builds
        deploys = CounterMetricFamily(
            "hourai_deploys",
            "deploys by result (ok, unchanged, refused, invalid)",
            labels=["result"],
        )
        for result, n in self.deploys.items():
            deploys.add_metric([result], n)
        yield deploys

        workers = GaugeMetricFamily(
            "hourai_workers", "worker processes by function and state", labels=["function", "state"]
        )
        queue = GaugeMetricFamily(
            "hourai_queue_depth", "requests waiting for a worker", labels=["function"]
        )
        inflight = GaugeMetricFamily(
            "hourai_inflight_requests", "requests being served", labels=["function"]
        )
        rejections = CounterMetricFamily(
            "hourai_rejections",
            "requests refused without a worker, by reason",
            labels=["function", "reason"],
        )
        stops = CounterMetricFamily(
            "hourai_worker_stops",
            "workers stopped by the scheduler, by reason",
            labels=["function", "reason"],
        )
        events = CounterMetricFamily(
            "hourai_function_events",
            "completed invocations, worker deaths, timeouts, forks, fork failures, cancels",
            labels=["function", "event"],
        )
        evictions = CounterMetricFamily(
            "hourai_evictions",
            "idle workers and snapshots evicted under the memory policy",
            labels=["function", "what"],
        )
        snapshots: Counter[str] = Counter()
        states: Counter[str] = Counter()
        policy_counts = runtime.resources.counts if runtime.resources is not None else Counter()
        for fn in scheduler.functions():
            st = scheduler.stats(fn)
            snapshots[st["snapshot"]] += 1
            states[st["state"]] += 1
            for state in WORKER_STATES:
                workers.add_metric([fn, state], st["workers"].get(state, 0))
            queue.add_metric([fn], st["queued"])
            inflight.add_metric([fn], st["inflight"])
            for reason, n in st["rejections"].items():
                rejections.add_metric([fn, reason], n)
            for reason, n in st["kills"].items():
                stops.add_metric([fn, reason], n)
            for event in ("completed", "died", "timeouts", "forks", "fork_failures", "cancelled"):
                if st.get(event):  # hundreds of functions x six zeros would be most of a scrape
                    events.add_metric([fn, event], st[event])
            evicted = st["kills"].get("evicted", 0)
            if evicted:
                evictions.add_metric([fn, "worker"], evicted)
            unloaded = policy_counts.get((fn, "unloaded"), 0)
            if unloaded:
                evictions.add_metric([fn, "snapshot"], unloaded)
        yield from (workers, queue, inflight, rejections, stops, events, evictions)

        snaps = GaugeMetricFamily(
            "hourai_snapshots",
            "functions by the state of their snapshot (ready, building, absent, failed)",
            labels=["state"],
        )
        for state, n in snapshots.items():
            snaps.add_metric([state], n)
        yield snaps
        fstates = GaugeMetricFamily(
            "hourai_functions",
            "functions by state (serving, building, backoff, trial, failed)",
            labels=["state"],
        )
        for state, n in states.items():
            fstates.add_metric([state], n)
        yield fstates
        changes = CounterMetricFamily(
            "hourai_function_state_changes",
            "state changes of functions (serving, backoff, failed, ...)",
            labels=["function", "state"],
        )
        for (fn, state), n in self.state_changes.items():
            changes.add_metric([fn, state], n)
        yield changes

        host = scheduler.host_stats()
        total = GaugeMetricFamily("hourai_host_workers", "worker processes on the host")
        total.add_metric([], host["workers"])
        yield total
        if host["max_host_workers"] is not None:
            cap = GaugeMetricFamily("hourai_host_workers_max", "configured max_host_workers")
            cap.add_metric([], host["max_host_workers"])
            yield cap
        tracer = runtime.tracer
        if tracer is not None:
            dropped = CounterMetricFamily(
                "hourai_trace_spans_dropped",
                "spans lost before reaching the collector (export queue full, export failed)",
            )
            dropped.add_metric([], tracer.dropped)
            yield dropped
            exported = CounterMetricFamily(
                "hourai_trace_spans_exported", "spans the collector accepted"
            )
            exported.add_metric([], tracer.exported)
            yield exported

        yield from self._tenants()
        for collector in self.collectors:
            yield from collector()

    def _tenants(self) -> Iterator[Metric]:
        runtime = self.runtime
        memory = GaugeMetricFamily(
            "hourai_tenant_memory_bytes", "memory charged to the tenant's cgroup", labels=["tenant"]
        )
        peak = GaugeMetricFamily(
            "hourai_tenant_memory_peak_bytes",
            "the cgroup's memory high-water mark",
            labels=["tenant"],
        )
        limit = GaugeMetricFamily(
            "hourai_tenant_memory_limit_bytes",
            "the tenant's declared memory maximum",
            labels=["tenant"],
        )
        cpu = CounterMetricFamily(
            "hourai_tenant_cpu_seconds", "CPU time used by the tenant's cgroup", labels=["tenant"]
        )
        pids = GaugeMetricFamily(
            "hourai_tenant_pids", "processes and threads in the tenant's cgroup", labels=["tenant"]
        )
        ooms = CounterMetricFamily(
            "hourai_tenant_oom_kills",
            "processes the kernel OOM-killed in the tenant",
            labels=["tenant"],
        )
        for tenant in sorted({spec.tenant for spec in runtime.functions.values()}):
            try:
                usage = runtime.cgroups.usage(tenant)
            except (CgroupError, OSError):
                continue
            memory.add_metric([tenant], usage.memory_current)
            peak.add_metric([tenant], usage.memory_peak)
            cpu.add_metric([tenant], usage.cpu_usec / 1e6)
            pids.add_metric([tenant], usage.pids)
            ooms.add_metric([tenant], usage.oom_kills)
            declared = runtime.tenant_limits.get(tenant)
            if declared is not None and declared.memory_max is not None:
                limit.add_metric([tenant], declared.memory_max)
        yield from (memory, peak, limit, cpu, pids, ooms)
