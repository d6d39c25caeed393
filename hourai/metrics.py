"""Prometheus metrics, aggregated in the daemon (one process: no multiprocess files)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from hourai.daemon import Observer
from hourai.scheduler.core import FunctionState

if TYPE_CHECKING:
    from hourai.daemon import Runtime

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)


class Metrics(Observer):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hourai_requests",
            "Requests answered",
            ["function", "status", "start"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "hourai_request_seconds",
            "Request latency in the daemon, by start path",
            ["function", "start"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.states = Counter(
            "hourai_function_state_changes",
            "Function state changes",
            ["function", "state"],
            registry=self.registry,
        )
        self.registry.register(_Live(runtime))

    def request_done(self, function: str, status: int, start: str, seconds: float) -> None:
        self.requests.labels(function, str(status), start).inc()
        self.latency.labels(function, start).observe(seconds)

    def function_state(self, state: FunctionState) -> None:
        self.states.labels(state.function, state.state).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Live:
    """Gauges read at scrape time from the scheduler, the policy and the cgroups."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rt = self.runtime
        workers = GaugeMetricFamily(
            "hourai_workers", "Workers by state", labels=["function", "state"]
        )
        queued = GaugeMetricFamily("hourai_queue_depth", "Requests waiting", labels=["function"])
        rejected = GaugeMetricFamily(
            "hourai_rejections", "Requests refused, by reason", labels=["function", "reason"]
        )
        snapshots = GaugeMetricFamily("hourai_snapshots", "Snapshot processes alive")
        actions = GaugeMetricFamily(
            "hourai_policy_actions", "Adaptive policy actions", labels=["function", "action"]
        )
        memory = GaugeMetricFamily("hourai_tenant_memory_bytes", "Tenant memory", labels=["tenant"])
        cpu = GaugeMetricFamily("hourai_tenant_cpu_seconds", "Tenant CPU time", labels=["tenant"])
        for name in rt.scheduler.functions():
            st = rt.scheduler.stats(name)
            for state, n in st["workers"].items():
                workers.add_metric([name, state], n)
            queued.add_metric([name], st["queued"])
            for reason, n in st["rejections"].items():
                rejected.add_metric([name, reason], n)
        snapshots.add_metric([], sum(1 for v in rt.versions.values() if v.handle is not None))
        if rt.resources is not None:
            for (fn, action), n in rt.resources.counts.items():
                actions.add_metric([fn, action], n)
        for tenant in sorted({s.tenant for s in rt.functions.values()}):
            try:
                usage = rt.cgroups.usage(tenant)
            except Exception:
                continue
            memory.add_metric([tenant], usage.memory_current)
            cpu.add_metric([tenant], usage.cpu_usec / 1e6)
        yield from (workers, queued, rejected, snapshots, actions, memory, cpu)
