"""The trace simulator: policies replayed on a simulated clock, on the real sample (quick) and on
small synthetic traces whose right answers are known."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import BenchContext
from bench.simulate import Simulation, build_workload, run
from bench.traces import load_azure
from hourai.scheduler.policy import (
    AdaptivePolicy,
    FixedKeepAlivePolicy,
    NeverUnloadPolicy,
    SetTenantCpuWeight,
    TenantUsage,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / ".." / "shared" / "traces" / "azure2019-sample70" / "70_inv.csv"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REQUIRED = {"hourai", "fixed-10m", "never-unload", "hourai@cap", "lru-ttl@cap"}
METRICS = {"cold_start_pct", "cold_start_p75_pct", "wasted_memory_gb_s"}

RUN_HEADER = (
    "HashFunction,HashApp,HashOwner,Count,Average,Minimum,Maximum,percentile_Average_0,"
    "percentile_Average_1,percentile_Average_25,percentile_Average_50,percentile_Average_75,"
    "percentile_Average_99,percentile_Average_100"
)
MEM_HEADER = (
    "HashApp,HashOwner,SampleCount,AverageAllocatedMb,AverageAllocatedMb_pct1,"
    "AverageAllocatedMb_pct5,AverageAllocatedMb_pct25,AverageAllocatedMb_pct50,"
    "AverageAllocatedMb_pct75,AverageAllocatedMb_pct95,AverageAllocatedMb_pct99,"
    "AverageAllocatedMb_pct100"
)


def write_trace(d: Path, patterns: dict[str, list[int]], companions: bool = True) -> Path:
    """An invitro-layout trio: per-minute counts per function; 100 ms runs, 256 MB apps."""
    minutes = len(next(iter(patterns.values())))
    lines = [
        "HashFunction,HashApp,HashOwner," + ",".join(f"minute_{i + 1}" for i in range(minutes))
    ]
    lines += [f"{n},{n},{n}," + ",".join(map(str, c)) for n, c in patterns.items()]
    inv = d / "tiny_inv.csv"
    inv.write_text("\n".join(lines) + "\n")
    if companions:
        run_rows = [f"{n},{n},{n},1,100,90.0,110.0,90,90,95,100,105,110,110" for n in patterns]
        (d / "tiny_run.csv").write_text("\n".join([RUN_HEADER, *run_rows]) + "\n")
        mem_rows = [f"{n},{n},1,256,250,250,255,256,257,260,260,260" for n in patterns]
        (d / "tiny_mem.csv").write_text("\n".join([MEM_HEADER, *mem_rows]) + "\n")
    return inv


def every(period: int, minutes: int = 1440) -> list[int]:
    return [1 if m % period == 0 else 0 for m in range(minutes)]


def once(at: int, minutes: int = 1440) -> list[int]:
    return [1 if m == at else 0 for m in range(minutes)]


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_trace(
        tmp_path, {"every5": every(5), "every15": every(15), "once": once(30), "hot": [3] * 1440}
    )


def simulate_one(inv: Path, policy, cap=None) -> tuple[Simulation, dict]:
    sim = Simulation(build_workload(load_azure(inv), seed=1), policy, cap=cap)
    return sim, sim.run()


def by_name(sim: Simulation, name: str):
    return next(s for s in sim.fns if s.model.name == name)


def test_periodic_functions_stop_cold_starting_once_learned(tiny):
    sim, result = simulate_one(tiny, AdaptivePolicy())
    # Only the very first invocation of each is cold: while the histogram is young the 4-hour
    # fallback covers the gaps, and after that the pre-warms land before each call.
    assert by_name(sim, "every5").cold == 1
    assert by_name(sim, "every15").cold == 1
    assert by_name(sim, "every15").prewarms > 50
    fixed, _ = simulate_one(tiny, FixedKeepAlivePolicy(600.0))
    assert by_name(fixed, "every5").cold == 1
    assert by_name(fixed, "every15").cold == 96  # every call: the gap outlasts 10 minutes
    # Pre-warming instead of holding: less idle snapshot memory than keeping it loaded.
    _, never_result = simulate_one(tiny, NeverUnloadPolicy())
    assert result["wasted_snapshot_gb_s"] < never_result["wasted_snapshot_gb_s"]


def test_a_function_never_invoked_again_is_released(tiny):
    sim, _ = simulate_one(tiny, AdaptivePolicy())
    assert not by_name(sim, "once").loaded
    assert sim.policy.explain("once")["counters"]["unloads"] == 1
    never, _ = simulate_one(tiny, NeverUnloadPolicy())
    assert by_name(never, "once").loaded


def test_policy_and_simulator_agree_on_cold_starts(tiny):
    sim, result = simulate_one(tiny, AdaptivePolicy())
    told = sum(sim.policy.explain(s.model.name)["counters"]["cold_starts"] for s in sim.fns)
    assert told == result["cold_starts"]
    assert result["invocations"] == 288 + 96 + 1 + 3 * 1440


def weighted_fair(demand: dict[str, float], weight: dict[str, int], cores: float) -> dict:
    """What CFS gives tenants whose groups want ``demand`` cores, in the fluid limit: weighted
    max-min fairness (water-filling) over ``cores``."""
    got = dict.fromkeys(demand, 0.0)
    left = {t for t, d in demand.items() if d > 0}
    free = cores
    while left and free > 1e-12:
        total = sum(weight[t] for t in left)
        share = {t: free * weight[t] / total for t in left}
        done = {t for t in left if demand[t] - got[t] <= share[t]}
        if not done:
            for t in left:
                got[t] += share[t]
            break
        for t in done:
            free -= demand[t] - got[t]
            got[t] = demand[t]
        left -= done
    return got


def test_on_a_trace_no_tenant_with_demand_gets_less_than_an_equal_share_of_cpu(tmp_path):
    # "hog" wants 2 cores all the time (1200 calls of 100 ms a minute); the others are light.
    minutes = 120
    inv = write_trace(
        tmp_path,
        {"hog": [1200] * minutes, "light": every(2, minutes), "bursty": every(30, minutes)},
    )
    workload = build_workload(load_azure(inv), seed=1)
    tenants = [f.tenant for f in workload.fns]
    demand_at: dict[int, dict[str, float]] = {}
    for at, i, duration in workload.arrivals:
        second = demand_at.setdefault(int(at), dict.fromkeys(tenants, 0.0))
        second[tenants[i]] += duration
    policy = AdaptivePolicy()
    for t in tenants:
        policy.declare_tenant(t, None)
    weight = dict.fromkeys(tenants, 100)
    used = dict.fromkeys(tenants, 0.0)
    cores = 2.0
    worst = 1.0
    for now in range(minutes * 60):
        demand = {t: min(cores, d) for t, d in demand_at.get(now, {}).items()}
        demand = {t: demand.get(t, 0.0) for t in tenants}
        got = weighted_fair(demand, weight, cores)
        active = [t for t in tenants if demand[t] > 0]
        for t in active:
            fair = min(demand[t], cores / len(active))
            worst = min(worst, got[t] / fair)
            used[t] += got[t]
        usage = {t: TenantUsage(64 << 20, used[t]) for t in tenants}
        policy.observe_memory(float(now), 0, tenants=usage)
        for d in policy.decide(float(now)):
            if isinstance(d, SetTenantCpuWeight):
                weight[d.tenant] = d.weight
    assert worst >= 0.999, f"a tenant got {worst:.1%} of its equal share"


def test_cap_is_never_exceeded_and_overload_is_refused(tmp_path):
    # Two 256 MB functions always busy (long runs), a cap that fits one: the other is refused.
    inv = write_trace(tmp_path, {"a": [2] * 60, "b": [2] * 60})
    cap = 300 * (1 << 20)
    _, result = simulate_one(inv, AdaptivePolicy(), cap=cap)
    assert result["peak_memory_gb"] * (1 << 30) <= cap
    assert result["rejected"] > 0
    assert result["cold_starts"] + result["rejected"] <= result["invocations"]


@pytest.mark.skipif(
    not (SAMPLE.parent.parent / "serverlessbench-cdfs" / "memCDF.csv").is_file(),
    reason="the ServerlessBench CDFs (../shared/traces/serverlessbench-cdfs) are not present",
)
def test_missing_companion_files_are_drawn_from_the_cdfs(tmp_path):
    inv = write_trace(tmp_path, {"x": every(7), "y": every(11)}, companions=False)
    wl = build_workload(load_azure(inv), seed=4)
    assert wl.source["durations_from_cdf"] == 2 and wl.source["memory_from_cdf"] == 2
    assert all(m.snapshot_bytes > 0 and m.worker_bytes < m.snapshot_bytes for m in wl.fns)


def test_arrivals_are_reproducible_and_per_function(tiny, tmp_path):
    a = build_workload(load_azure(tiny), seed=9)
    b = build_workload(load_azure(tiny), seed=9)
    c = build_workload(load_azure(tiny), seed=10)
    assert a.arrivals == b.arrivals
    assert a.arrivals != c.arrivals
    # Spread within their minute.
    counts = load_azure(tiny).functions[0].counts
    starts = sorted(t for t, i, _ in a.arrivals if i == 0)
    assert [int(t // 60) for t in starts] == [m for m, n in enumerate(counts) for _ in range(n)]
    # A function's arrivals do not depend on which other functions are in the file.
    alone = tmp_path / "alone"
    alone.mkdir()
    solo = build_workload(load_azure(write_trace(alone, {"every15": every(15)})), seed=9)
    idx = [m.name for m in a.fns].index("every15")
    assert [t for t, i, _ in a.arrivals if i == idx] == [t for t, _, _ in solo.arrivals]


@pytest.mark.skipif(not SAMPLE.is_file(), reason="the 70-function sample is not present")
def test_quick_run_on_the_real_sample(tmp_path):
    ctx = BenchContext(out=tmp_path, quick=True, seed=1, trace=SAMPLE)
    out = run(ctx)
    saved = json.loads((tmp_path / "simulate.json").read_text())
    assert saved["policies"].keys() == out["policies"].keys()
    assert saved["policies"].keys() >= REQUIRED
    for name, r in saved["policies"].items():
        assert r.keys() >= METRICS, name
        assert 0 <= r["cold_start_pct"] <= 100 and 0 <= r["cold_start_p75_pct"] <= 100
        assert r["wasted_memory_gb_s"] >= 0
    p = saved["policies"]
    assert saved["workload"]["minutes"] == 120
    # Never unloading has the fewest cold starts and the most waste of all.
    assert p["never-unload"]["cold_starts"] == min(r["cold_starts"] for r in p.values())
    assert p["never-unload"]["wasted_memory_gb_s"] == max(
        r["wasted_memory_gb_s"] for r in p.values()
    )
    # The fixed keep-alive curve trades memory for cold starts monotonically.
    curve = [p[f"fixed-{m}m"] for m in (5, 10, 20, 60)]
    assert [r["wasted_memory_gb_s"] for r in curve] == sorted(
        r["wasted_memory_gb_s"] for r in curve
    )
    assert [r["cold_starts"] for r in curve] == sorted(
        (r["cold_starts"] for r in curve), reverse=True
    )
    for name in ("hourai@cap", "lru-ttl@cap"):
        assert p[name]["peak_memory_gb"] <= p[name]["cap_gb"] * (1 + 1e-9)
    assert {"p75_vs_fixed10", "cap_vs_lru_ttl", "policy_cost"} <= saved["goals"].keys()
    assert saved["goals"]["policy_cost"]["decide_us_per_decision"] > 0
    assert (tmp_path / "simulate.png").read_bytes()[:8] == PNG_MAGIC


def test_command_line(tiny, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "simulate", "--trace", str(tiny), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| hourai |" in proc.stdout
    saved = json.loads((out / "simulate.json").read_text())
    assert saved["policies"].keys() >= REQUIRED
    assert (out / "simulate.png").read_bytes()[:8] == PNG_MAGIC


def test_command_line_names_a_missing_trace(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "simulate", "--trace", str(tmp_path / "no_inv.csv")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "no_inv.csv not found" in proc.stderr
