"""The adaptive policy: keep-alive and pre-warm from the idle-time histogram, Greedy-Dual
eviction, admission, tenant limits, persistence, and the baselines behind the same interface."""

from __future__ import annotations

import json
import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hourai.scheduler.policy import (
    AdaptivePolicy,
    EvictWorkers,
    FixedKeepAlivePolicy,
    FunctionHistory,
    KeepAlivePolicy,
    NeverUnloadPolicy,
    PolicyParams,
    PrewarmSnapshot,
    SetTenantCpuWeight,
    SetTenantMemoryHigh,
    TenantUsage,
    UnloadSnapshot,
)

MiB = 1 << 20
GiB = 1 << 30
MIN = 60.0


def run_until(policy: KeepAlivePolicy, start: float, end: float, step: float = 1.0) -> list:
    """Call decide on a 1-second timer from start to end, as the daemon does; all decisions."""
    out = []
    t = start
    while t <= end:
        out += [(t, d) for d in policy.decide(t)]
        t += step
    return out


def invoke(policy: KeepAlivePolicy, fn: str, at: float, duration: float = 1.0) -> None:
    policy.on_invocation(fn, at)
    policy.on_idle(fn, at + duration)


def periodic(policy: KeepAlivePolicy, fn: str, period: float, count: int) -> float:
    """Invoke fn every period seconds from 0, driving decide in between; returns the time of
    the last invocation."""
    t = 0.0
    for _ in range(count):
        run_until(policy, t - period + 1 if t > 0 else t, t - 1)
        invoke(policy, fn, t)
        t += period
    return t - period


# --- keep-alive and pre-warm -----------------------------------------------------------------


def test_new_function_gets_the_fallback_keep_alive():
    p = AdaptivePolicy()
    p.register("f")
    prewarm, keep = p.snapshot_keep_alive("f")
    assert prewarm == 0 and keep == p.params.fallback_keep_alive_s == 4 * 3600
    assert p.explain("f")["windows"]["source"].startswith("fallback")


def test_periodic_function_is_unloaded_between_calls_and_prewarmed_before_the_next():
    p = AdaptivePolicy()
    # Every 30 minutes, 1 s long: idle times of 29 min 59 s, all in bin 29.
    last = periodic(p, "cron", 30 * MIN, 8)
    prewarm, keep = p.snapshot_keep_alive("cron")
    assert prewarm == pytest.approx(29 * MIN * 0.9)
    assert prewarm + keep == pytest.approx(30 * MIN * 1.1)
    # The next idle period: linger a minute, unload, pre-warm before the next call.
    later = run_until(p, last + 2, last + 30 * MIN - 1)
    kinds = [(round(t - last - 1), type(d).__name__) for t, d in later]
    assert kinds == [(60, "UnloadSnapshot"), (math.ceil(prewarm), "PrewarmSnapshot")]
    before = p.explain("cron")["counters"]
    invoke(p, "cron", last + 30 * MIN)
    after = p.explain("cron")["counters"]
    assert after["cold_starts"] == before["cold_starts"]
    assert after["prewarm_hits"] == before["prewarm_hits"] + 1


def test_bursty_function_windows_come_from_the_gaps_between_bursts():
    p = AdaptivePolicy()
    t = 0.0
    for _ in range(10):  # bursts of 5 calls 2 s apart, every 15 minutes
        for i in range(5):
            invoke(p, "burst", t + 2 * i, duration=0.5)
        t += 15 * MIN
    prewarm, keep = p.snapshot_keep_alive("burst")
    # Over all idle times the 5th percentile would be ~1.5 s (keep it loaded all the time);
    # over the idle times that outlast the linger it is ~14.9 min.
    assert prewarm == pytest.approx(14 * MIN * 0.9)
    assert prewarm + keep == pytest.approx(15 * MIN * 1.1)


def test_short_idle_times_only_give_a_short_keep_alive():
    p = AdaptivePolicy()
    for i in range(50):
        invoke(p, "hot", i * 10.0, duration=1.0)
    prewarm, keep = p.snapshot_keep_alive("hot")
    assert prewarm == 0 and keep == p.params.linger_s


def test_out_of_bound_idle_times_use_the_forecast():
    p = AdaptivePolicy()
    for i in range(8):  # every 6 hours: beyond the 4-hour histogram range
        invoke(p, "daily", i * 6 * 3600.0, duration=0.0)
    prewarm, keep = p.snapshot_keep_alive("daily")
    assert prewarm == pytest.approx(0.85 * 6 * 3600)
    assert keep == pytest.approx(0.30 * 6 * 3600)
    assert p.explain("daily")["windows"]["source"].startswith("forecast")


def test_flat_histogram_is_not_representative():
    p = AdaptivePolicy()
    t = 0.0
    for i in range(200):  # idle times spread evenly over 1..200 minutes
        invoke(p, "flat", t, duration=0.0)
        t += (1 + (i * 37) % 200) * MIN + 1
    info = p.explain("flat")
    assert info["histogram"]["cv"] < p.params.cv_threshold
    assert info["windows"]["source"] == "fallback: histogram not representative"
    assert p.snapshot_keep_alive("flat") == (0.0, p.params.fallback_keep_alive_s)


def test_few_idle_times_keep_the_fallback():
    p = AdaptivePolicy(PolicyParams(min_samples=3))
    invoke(p, "f", 0.0)
    invoke(p, "f", 10 * MIN)
    assert p.explain("f")["windows"]["source"] == "fallback: few idle times"
    invoke(p, "f", 20 * MIN)
    invoke(p, "f", 30 * MIN)
    assert p.explain("f")["windows"]["source"].startswith("histogram")


def test_invocation_during_linger_cancels_the_unload():
    p = AdaptivePolicy()
    invoke(p, "f", 0.0)
    assert run_until(p, 1, 30) == []
    p.on_invocation("f", 31.0)
    assert run_until(p, 31, 4 * 3600 + 100) == []  # busy: nothing is unloaded under it
    p.on_idle("f", 5 * 3600.0)
    # The one idle time seen (30 s) was shorter than the linger: that is all it gets now.
    out = run_until(p, 5 * 3600.0, 9 * 3600.0 + 10)
    assert [(t, type(d)) for t, d in out] == [(5 * 3600.0 + 60, UnloadSnapshot)]


def test_on_unloaded_cancels_timers_and_next_invocation_is_cold():
    p = AdaptivePolicy()
    invoke(p, "f", 0.0)
    p.on_unloaded("f", 5.0)
    assert run_until(p, 5, 5 * 3600) == []
    invoke(p, "f", 5 * 3600.0)
    assert p.explain("f")["counters"]["cold_starts"] == 2


def test_next_wakeup_says_when_decide_has_work():
    p = FixedKeepAlivePolicy(600.0)
    assert p.next_wakeup() == math.inf
    invoke(p, "f", 0.0, duration=1.0)
    assert p.next_wakeup() == -math.inf  # an idle function to plan
    assert p.decide(2.0) == []
    assert p.next_wakeup() == pytest.approx(601.0)
    assert p.decide(600.0) == []
    assert [type(d) for d in p.decide(601.0)] == [UnloadSnapshot]


def test_forget_drops_the_function_and_its_timers():
    p = AdaptivePolicy()
    invoke(p, "f", 0.0)
    p.forget("f")
    assert run_until(p, 1, 5 * 3600, step=60) == []
    with pytest.raises(KeyError):
        p.explain("f")


# --- baselines -------------------------------------------------------------------------------


def test_fixed_keep_alive_unloads_after_exactly_its_time():
    p = FixedKeepAlivePolicy(10 * MIN)
    invoke(p, "f", 0.0, duration=5.0)
    out = run_until(p, 0, 20 * MIN)
    assert [(t, type(d)) for t, d in out] == [(605.0, UnloadSnapshot)]
    assert p.snapshot_keep_alive("f") == (0.0, 600.0)


def test_never_unload_never_unloads():
    p = NeverUnloadPolicy()
    invoke(p, "f", 0.0)
    assert run_until(p, 0, 48 * 3600, step=600) == []
    assert p.snapshot_keep_alive("f") == (0.0, math.inf)


def test_lru_ttl_evicts_least_recently_used_under_pressure():
    p = FixedKeepAlivePolicy(3600.0, PolicyParams(memory_budget_bytes=3 * GiB))
    for i, fn in enumerate(["a", "b", "c"]):
        p.observe_cost(fn, 0.1, GiB, MiB)
        invoke(p, fn, 10.0 * (3 - i))  # c is used first, a last
    p.decide(40.0)
    p.observe_memory(41.0, 3 * GiB)
    adm = p.admit("d", GiB, 41.0)
    assert adm.ok
    assert [d.fn for d in adm.evictions] == ["c"]


# --- eviction: Greedy-Dual ---------------------------------------------------------------------


def _loaded_idle(p: KeepAlivePolicy, fn: str, *, calls: int, cost: float, size: int, t: float):
    p.observe_cost(fn, cost, size, 10 * MiB)
    for i in range(calls):
        invoke(p, fn, t + i * 0.1, duration=0.01)


def test_greedy_dual_evicts_lowest_frequency_times_cost_per_size_first():
    p = AdaptivePolicy(PolicyParams(memory_budget_bytes=10 * GiB))
    _loaded_idle(p, "cheap-big", calls=5, cost=0.05, size=4 * GiB, t=0)  # 5*0.05/4 = 0.06
    _loaded_idle(p, "dear-small", calls=5, cost=0.5, size=GiB, t=0)  # 2.5
    _loaded_idle(p, "hot", calls=100, cost=0.1, size=2 * GiB, t=0)  # 5
    p.decide(20.0)
    p.observe_memory(21.0, int(9.9 * GiB))
    out = p.decide(21.0)  # above the 95% high watermark: down to 85%
    unloads = [d.fn for d in out if isinstance(d, UnloadSnapshot)]
    assert unloads == ["cheap-big"]
    assert "memory pressure" in p.explain("cheap-big")["last_eviction"]
    # Greedy-Dual's clock rose to the evicted priority: later uses start from there.
    assert p.explain("hot")["state"]["priority"] > 0.06


def test_idle_workers_go_before_any_snapshot():
    p = AdaptivePolicy(PolicyParams(memory_budget_bytes=10 * GiB))
    _loaded_idle(p, "a", calls=1, cost=0.1, size=4 * GiB, t=0)
    _loaded_idle(p, "b", calls=50, cost=0.1, size=4 * GiB, t=0)
    p.decide(10.0)
    p.observe_workers("b", 30)  # 30 x 10 MiB
    p.observe_memory(11.0, int(8 * GiB + 300 * MiB))
    adm = p.admit("c", int(2.5 * GiB), 11.0)  # 0.8 GiB over: workers and one snapshot
    assert adm.ok
    assert isinstance(adm.evictions[0], EvictWorkers) and adm.evictions[0].fn == "b"
    assert [type(d) for d in adm.evictions] == [EvictWorkers, UnloadSnapshot]
    assert adm.evictions[1].fn == "a"


# --- admission -------------------------------------------------------------------------------


def test_admission_refuses_with_a_reason_when_nothing_can_be_evicted():
    p = AdaptivePolicy(PolicyParams(memory_budget_bytes=4 * GiB))
    p.observe_cost("busy", 0.1, 3 * GiB, MiB)
    p.on_invocation("busy", 0.0)  # in flight: not evictable
    p.observe_memory(1.0, 3 * GiB)
    adm = p.admit("new", 2 * GiB, 1.0)
    assert not adm.ok
    assert "memory" in adm.reason and "needs 2.0 GiB" in adm.reason
    assert adm.evictions == ()
    assert p.admit("small", 512 * MiB, 1.0).ok


def test_admission_never_evicts_the_function_being_admitted():
    p = AdaptivePolicy(PolicyParams(memory_budget_bytes=4 * GiB))
    _loaded_idle(p, "f", calls=1, cost=0.1, size=3 * GiB, t=0)
    p.decide(5.0)
    p.observe_memory(5.0, 3 * GiB)
    adm = p.admit("f", 2 * GiB, 5.0)  # a fork of f needs f's own snapshot
    assert not adm.ok


def test_budget_follows_the_host():
    p = AdaptivePolicy(PolicyParams(memory_budget_bytes=100 * GiB, host_memory_fraction=0.5))
    assert p.budget() == 100 * GiB
    p.observe_memory(0.0, 0, total_bytes=16 * GiB)
    assert p.budget() == 8 * GiB


# --- tenant limits ---------------------------------------------------------------------------


def test_memory_high_follows_the_working_set_and_stays_under_the_declared_max():
    p = AdaptivePolicy(PolicyParams(tenant_resize_interval_s=10.0))
    p.declare_tenant("small", 256 * MiB)
    out = []
    for i in range(100):
        usage = {
            "acme": TenantUsage(200 * MiB + (i % 10) * MiB, i * 0.5),
            "small": TenantUsage(300 * MiB, 0.0),
        }
        p.observe_memory(float(i), 0, tenants=usage)
        out += p.decide(float(i))
    highs = {d.tenant: d.memory_high for d in out if isinstance(d, SetTenantMemoryHigh)}
    assert 209 * MiB * 1.25 <= highs["acme"] <= 209 * MiB * 1.25 * 1.2
    assert highs["small"] == 256 * MiB
    # Hysteresis: the same readings again change nothing.
    emitted = sum(isinstance(d, SetTenantMemoryHigh) for d in out)
    assert emitted == 2


def test_memory_high_never_throttles_a_tenant_below_its_use_right_after_a_deploy():
    # A tenant quiet for hours (5 MiB), then deploys bring its use to 211 MiB at once.
    p = AdaptivePolicy(PolicyParams(tenant_resize_interval_s=30.0))
    p.declare_tenant("acme", None)
    highs: list[int] = []
    t = 0.0
    for _ in range(2000):
        p.observe_memory(t, 0, tenants={"acme": TenantUsage(5 * MiB, 0.0)})
        highs += [d.memory_high for d in p.decide(t) if isinstance(d, SetTenantMemoryHigh)]
        t += 1.0
    assert highs[-1] == 64 * MiB  # the floor: the working set is smaller
    p.declare_tenant("acme", None)  # the deploy
    for _ in range(3):
        p.observe_memory(t, 0, tenants={"acme": TenantUsage(211 * MiB, 0.0)})
        highs += [d.memory_high for d in p.decide(t) if isinstance(d, SetTenantMemoryHigh)]
        assert highs[-1] >= 211 * MiB * 1.25
        t += 1.0
    # Between resizes, too: growth that eats into the headroom raises memory.high at once.
    p.observe_memory(t, 0, tenants={"acme": TenantUsage(260 * MiB, 0.0)})
    out = p.decide(t)
    assert [d.memory_high for d in out if isinstance(d, SetTenantMemoryHigh)] == [
        int(260 * MiB * 1.25)
    ]
    assert p.tenant_stats()["acme"]["memory_high"] == int(260 * MiB * 1.25)


def test_cpu_weight_stays_the_equal_share_however_unequal_the_use():
    p = AdaptivePolicy(PolicyParams(tenant_resize_interval_s=5.0, cpu_demand_halflife_s=5.0))
    out = []
    for i in range(60):
        # busy burns both cores, quiet makes a 40 ms call now and then
        usage = {"busy": TenantUsage(64 * MiB, i * 2.0), "quiet": TenantUsage(64 * MiB, i * 0.01)}
        p.observe_memory(float(i), 0, tenants=usage)
        out += p.decide(float(i))
    assert not [d for d in out if isinstance(d, SetTenantCpuWeight)]
    stats = p.tenant_stats()
    assert stats["busy"]["cpu_demand_cores"] > 100 * stats["quiet"]["cpu_demand_cores"] > 0
    assert stats["busy"]["cpu_weight"] == stats["quiet"]["cpu_weight"] == 100


def test_reserved_cpu_weight_is_kept_and_the_policy_never_writes_one_below_the_default():
    p = AdaptivePolicy(PolicyParams(tenant_resize_interval_s=5.0))
    p.declare_tenant("reserved", None, cpu_weight=400)
    p.declare_tenant("low", None, cpu_weight=10)
    out = []
    for i in range(30):
        usage = {"reserved": TenantUsage(MiB, 0.0), "low": TenantUsage(MiB, i * 2.0)}
        p.observe_memory(float(i), 0, tenants=usage)
        out += p.decide(float(i))
    weights = [d for d in out if isinstance(d, SetTenantCpuWeight)]
    assert weights == [SetTenantCpuWeight("low", 100)]  # once; the reserved 400 stays as is
    assert p.tenant_stats()["reserved"]["cpu_weight"] == 400


usage_histories = st.lists(
    st.tuples(
        st.floats(0.01, 120.0),  # seconds since the last reading
        st.dictionaries(
            st.sampled_from(["a", "b", "c", "d"]),
            st.tuples(st.integers(0, 8 * GiB), st.floats(0.0, 2.0)),  # bytes, cores used
            min_size=1,
        ),
        st.one_of(  # now and then a deploy declares a tenant
            st.none(),
            st.tuples(
                st.sampled_from(["a", "b", "c", "d"]),
                st.one_of(st.none(), st.integers(64 * MiB, 8 * GiB)),
                st.one_of(st.none(), st.integers(1, 10000)),
            ),
        ),
    ),
    max_size=60,
)


@given(usage_histories, st.sampled_from([0.0, 5.0, 30.0]))
def test_no_usage_history_pushes_a_tenant_below_its_equal_share_or_its_use(
    history: list, resize_interval: float
) -> None:
    """For any usage history: every tenant's cpu weight is at least the default (the equal
    share among tenants with demand) and at least what it reserved; every memory.high set is
    at least the tenant's latest use (or its declared maximum)."""
    p = AdaptivePolicy(PolicyParams(tenant_resize_interval_s=resize_interval))
    now = 0.0
    cpu = {"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0}
    reserved: dict[str, int | None] = {}
    maxima: dict[str, int | None] = {}
    for dt, readings, declare in history:
        now += dt
        if declare is not None:
            name, memory_max, weight = declare
            p.declare_tenant(name, memory_max, weight)
            reserved[name], maxima[name] = weight, memory_max
        usage = {}
        for name, (nbytes, cores) in readings.items():
            cpu[name] += cores * dt
            usage[name] = TenantUsage(nbytes, cpu[name])
        p.observe_memory(now, 0, tenants=usage)
        for d in p.decide(now):
            if isinstance(d, SetTenantCpuWeight):
                assert d.weight >= 100 and d.weight >= (reserved.get(d.tenant) or 0), d
        for name, t in p.tenant_stats().items():
            assert t["cpu_weight"] >= max(100, reserved.get(name) or 0), (name, t)
            if t["memory_high"] is not None and name in readings:
                use = readings[name][0]
                cap = maxima.get(name)
                assert t["memory_high"] >= (use if cap is None else min(use, cap)), (name, t)


# --- persistence and bounds ------------------------------------------------------------------


def test_history_round_trips_through_json_and_msgpack_and_keeps_the_windows():
    p = AdaptivePolicy()
    periodic(p, "cron", 30 * MIN, 12)
    p.observe_cost("cron", 0.25, 300 * MiB, 2 * MiB)
    state = p.export_state("cron")
    for blob in (json.loads(json.dumps(state)), msgpack.unpackb(msgpack.packb(state))):
        q = AdaptivePolicy()
        q.register("cron", tenant="t", state=blob)
        assert q.snapshot_keep_alive("cron") == p.snapshot_keep_alive("cron")
        assert q.explain("cron")["costs"] == p.explain("cron")["costs"]
        assert q.explain("cron")["counters"] == p.explain("cron")["counters"]


def test_history_from_another_bin_layout_keeps_costs_but_not_the_histogram():
    p = AdaptivePolicy()
    periodic(p, "cron", 30 * MIN, 12)
    p.observe_cost("cron", 0.25, 300 * MiB, 2 * MiB)
    q = AdaptivePolicy(PolicyParams(bin_s=30.0))
    q.register("cron", state=p.export_state("cron"))
    assert q.explain("cron")["histogram"]["in_range"] == 0
    assert q.explain("cron")["costs"]["rebuild_s"] == 0.25


@pytest.mark.parametrize("bad", [{}, {"v": 2}, {"v": 1, "bins": "x", "n_bins": 240}, []])
def test_malformed_history_is_refused(bad):
    with pytest.raises(ValueError):
        FunctionHistory.from_dict(bad, 240)


def test_histogram_ages_instead_of_growing():
    params = PolicyParams(histogram_max_samples=64)
    h = FunctionHistory(params.n_bins)
    for i in range(10_000):
        h.record_idle(float(i % 7) * 60 + 1, params)
    assert h.in_range + h.oob < 64
    assert h.samples == 10_000
    assert len(h.bins) == 240


@pytest.mark.parametrize(
    "bad",
    [
        {"head_percentile": 99, "tail_percentile": 5},
        {"bin_s": 0},
        {"low_watermark": 0.99, "high_watermark": 0.9},
        {"min_samples": 0},
        {"linger_s": 5 * 3600},
    ],
)
def test_params_are_validated(bad):
    with pytest.raises(ValueError, match="PolicyParams"):
        PolicyParams(**bad)


# --- properties ------------------------------------------------------------------------------

FNS = ["a", "b", "c", "d"]
events = st.lists(
    st.tuples(
        st.sampled_from(["invoke", "idle", "decide", "admit", "cost", "workers", "memory"]),
        st.integers(0, len(FNS) - 1),
        # Gaps from sub-second to beyond the 4-hour range.
        st.one_of(st.floats(0, 120), st.floats(0, 20_000)),
        st.integers(0, 4 * GiB),
    ),
    max_size=120,
)


def drive(policy: KeepAlivePolicy, evs) -> tuple[list, list]:
    """Apply an event sequence; returns (decisions, admissions)."""
    now = 0.0
    decisions: list = []
    admissions: list = []
    for op, i, dt, n in evs:
        now += dt
        fn = FNS[i]
        if op == "invoke":
            policy.on_invocation(fn, now)
        elif op == "idle":
            policy.on_idle(fn, now)
        elif op == "decide":
            decisions += policy.decide(now)
        elif op == "admit":
            admissions.append(policy.admit(fn, n // 4, now))
        elif op == "cost":
            policy.observe_cost(fn, dt / 100, n, n // 64)
        elif op == "workers":
            policy.observe_workers(fn, n % 50)
        else:
            policy.observe_memory(now, n)
    decisions += policy.decide(now + 10 * 3600)
    return decisions, admissions


@settings(max_examples=150, deadline=None)
@given(events)
def test_state_stays_bounded(evs):
    p = AdaptivePolicy(PolicyParams(histogram_max_samples=16))
    drive(p, evs * 3)
    for fn in p.functions():
        state = p.export_state(fn)
        assert len(msgpack.packb(state)) <= 4096
        assert len(json.dumps(state)) <= 8192
        assert sum(c for _, c in state["bins"]) + state["oob"] < 16
    # Timers of functions invoked since are dropped, not hoarded.
    assert p.stats()["timers"] <= 4 * len(p.functions()) + 64


@settings(max_examples=150, deadline=None)
@given(events)
def test_decisions_are_deterministic(evs):
    for make in (AdaptivePolicy, lambda: FixedKeepAlivePolicy(600.0)):
        a = drive(make(), evs)
        b = drive(make(), evs)
        assert a == b


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.floats(0, 300), st.floats(0, 40_000)), max_size=80))
def test_windows_stay_within_bounds(idles):
    params = PolicyParams(min_samples=1)
    p = AdaptivePolicy(params)
    t = 0.0
    for idle in idles:
        p.on_invocation("f", t)
        p.on_idle("f", t)
        t += idle
    p.on_invocation("f", t)
    p.register("g")
    for fn in ("f", "g"):
        prewarm, keep = p.snapshot_keep_alive(fn)
        assert 0 <= prewarm <= params.max_prewarm_s
        assert prewarm == 0 or prewarm > params.linger_s
        assert params.min_keep_alive_s <= keep <= params.max_keep_alive_s
        assert p.explain(fn)["windows"]["linger_s"] == params.linger_s


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 200), st.floats(0.01, 2.0), st.integers(1, 4096)),
        min_size=2,
        max_size=12,
    )
)
def test_greedy_dual_order_is_lowest_priority_first(fns):
    total = sum(size_mib for _, _, size_mib in fns) * MiB
    p = AdaptivePolicy(PolicyParams(memory_budget_bytes=total))
    for i, (calls, cost, size_mib) in enumerate(fns):
        _loaded_idle(p, f"f{i}", calls=calls, cost=cost, size=size_mib * MiB, t=0)
    p.decide(30.0)  # within the linger: all still loaded
    priorities = {f"f{i}": p.explain(f"f{i}")["state"]["priority"] for i in range(len(fns))}
    p.observe_memory(31.0, total)
    adm = p.admit("new", total // 2, 31.0)
    assert adm.ok
    evicted = [d.fn for d in adm.evictions if isinstance(d, UnloadSnapshot)]
    order = [priorities[fn] for fn in evicted]
    assert order == sorted(order)
    # Whatever was kept has a priority at least that of everything evicted.
    kept = [v for fn, v in priorities.items() if fn not in evicted]
    assert all(k >= max(order) for k in kept)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, len(FNS) - 1),
            st.integers(0, 4 * GiB),
            st.sampled_from([False, False, True]),  # mostly left busy: room runs out
        ),
        max_size=40,
    )
)
def test_admission_never_exceeds_the_budget(requests):
    """Replays the admitted commitments and evictions the way a host would: memory in use
    never exceeds the budget, and a refusal always leaves it unchanged."""
    budget = 8 * GiB
    p = AdaptivePolicy(PolicyParams(memory_budget_bytes=budget))
    snapshot = {fn: 0 for fn in FNS}  # bytes of each function's loaded snapshot
    busy = set()
    now = 0.0
    for i, need, finish in requests:
        fn = FNS[i]
        now += 1.0
        used = sum(snapshot.values())
        p.observe_memory(now, used)
        adm = p.admit(fn, need, now)
        if not adm.ok:
            assert adm.reason and not adm.evictions
            continue
        for d in adm.evictions:
            assert isinstance(d, UnloadSnapshot) and d.fn not in busy and d.fn != fn
            snapshot[d.fn] = 0
            p.on_unloaded(d.fn, now)
        snapshot[fn] += need
        p.observe_cost(fn, 0.1, snapshot[fn], MiB)
        p.on_invocation(fn, now)
        busy.add(fn)
        assert sum(snapshot.values()) <= budget
        if finish:
            p.on_idle(fn, now + 0.5)
            busy.discard(fn)
        for d in p.decide(now + 0.5):
            if isinstance(d, UnloadSnapshot):
                snapshot[d.fn] = 0
            assert not isinstance(d, PrewarmSnapshot)  # nothing learned yet


def test_one_tenants_use_cannot_get_another_tenants_rebuild_refused():
    """A hog holding most of the budget in busy workers (nothing evictable) gets its own
    next rebuild refused; a small tenant, within an equal share, is still admitted."""
    p = AdaptivePolicy(PolicyParams(memory_budget_bytes=4 * GiB))
    p.register("hog-fn", "hog")
    p.register("small-fn", "small")
    p.declare_tenant("hog", 8 * GiB)
    p.declare_tenant("small", 1 * GiB)
    p.observe_cost("hog-fn", 0.1, 64 * MiB, MiB)
    p.on_invocation("hog-fn", 0.0)  # busy: not evictable
    usage = {"hog": TenantUsage(4 * GiB, 0.0), "small": TenantUsage(16 * MiB, 0.0)}
    p.observe_memory(1.0, 4 * GiB + 16 * MiB, tenants=usage)  # over the budget
    small = p.admit("small-fn", 3 * MiB, 1.0)
    assert small.ok and "share" in small.reason
    hog = p.admit("hog-fn", 64 * MiB, 1.0)
    assert not hog.ok and "tenant hog uses" in hog.reason
