"""Trace readers: both Azure 2019 layouts, the ServerlessBench CDFs, and clear format errors."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bench.traces import (
    EmpiricalCdf,
    Percentiles,
    TraceFormatError,
    companion_paths,
    load_azure,
    load_serverlessbench,
    subset,
    synthesize,
)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "traces"
SAMPLE = SHARED / "azure2019-sample70" / "70_inv.csv"
needs_sample = pytest.mark.skipif(not SAMPLE.is_file(), reason=f"{SAMPLE} not present")
needs_cdfs = pytest.mark.skipif(
    not (SHARED / "serverlessbench-cdfs" / "memCDF.csv").is_file(), reason="no ServerlessBench CDFs"
)

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


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_trio(d: Path, inv_rows: list[str], minutes: int = 3) -> Path:
    header = "HashFunction,HashApp,HashOwner," + ",".join(f"minute_{i + 1}" for i in range(minutes))
    inv = write(d / "t_inv.csv", [header, *inv_rows])
    write(d / "t_run.csv", [RUN_HEADER, "f1,f1,f1,5,100,10.0,900.0,10,20,50,100,200,800,900"])
    write(d / "t_mem.csv", [MEM_HEADER, "f1,f1,10,128,100,110,120,128,130,140,150,160"])
    return inv


@needs_sample
def test_the_70_function_sample_loads_whole():
    t = load_azure(SAMPLE)
    assert len(t.functions) == 70
    assert t.minutes == 1440
    assert t.invocations == 411240
    assert t.run_path is not None and t.mem_path is not None
    assert all(f.durations_ms is not None and f.memory_mb is not None for f in t.functions)
    assert all(len(f.counts) == 1440 for f in t.functions)


@needs_sample
def test_minutes_keeps_the_head_of_the_day_and_drops_silent_functions():
    t = load_azure(SAMPLE, minutes=120)
    assert t.minutes == 120
    assert all(len(f.counts) == 120 and f.invocations > 0 for f in t.functions)
    assert len(t.functions) < 70


def test_percentiles_are_interpolated_and_clamped(tmp_path):
    t = load_azure(tiny_trio(tmp_path, ["f1,f1,f1,1,0,2"]))
    d = t.functions[0].durations_ms
    assert d is not None
    assert d.inverse(0.0) == 10
    assert d.inverse(0.5) == 100
    assert d.inverse(0.375) == pytest.approx(75)
    assert d.inverse(1.0) == 900
    m = t.functions[0].memory_mb
    assert m is not None and m.average == 128
    assert m.inverse(0.0) == 100  # no p0 column: below p1 is p1


def test_original_azure_layout_is_read_by_column_names(tmp_path):
    inv = write(
        tmp_path / "invocations_per_function_md.anon.d01.csv",
        ["HashOwner,HashApp,HashFunction,Trigger,1,2", "o1,a1,f1,http,3,0", "o1,a1,f2,timer,0,1"],
    )
    write(
        tmp_path / "function_durations_percentiles.anon.d01.csv",
        [
            "HashOwner,HashApp,HashFunction,Average,Count,Minimum,Maximum,percentile_Average_0,"
            "percentile_Average_1,percentile_Average_25,percentile_Average_50,"
            "percentile_Average_75,percentile_Average_99,percentile_Average_100",
            "o1,a1,f1,50,3,5,90,5,6,20,50,70,88,90",
        ],
    )
    write(
        tmp_path / "app_memory_percentiles.anon.d01.csv",
        [
            "HashOwner,HashApp,SampleCount,AverageAllocatedMb,AverageAllocatedMb_pct1,"
            "AverageAllocatedMb_pct5,AverageAllocatedMb_pct25,AverageAllocatedMb_pct50,"
            "AverageAllocatedMb_pct75,AverageAllocatedMb_pct95,AverageAllocatedMb_pct99,"
            "AverageAllocatedMb_pct100",
            "o1,a1,4,200,150,160,180,200,210,220,230,240",
        ],
    )
    t = load_azure(inv)
    f1, f2 = t.functions
    assert (f1.name, f1.app, f1.owner, f1.counts) == ("f1", "a1", "o1", (3, 0))
    assert f1.durations_ms is not None and f1.durations_ms.inverse(0.5) == 50
    assert f2.durations_ms is None  # no row: the simulator draws it from the CDFs
    assert f1.memory_mb is not None and f2.memory_mb is not None  # per app
    assert f2.memory_mb.average == 200


def test_companion_files_are_optional(tmp_path):
    inv = write(tmp_path / "x_inv.csv", ["HashFunction,HashApp,HashOwner,minute_1", "f,f,f,2"])
    t = load_azure(inv)
    assert t.run_path is None and t.mem_path is None
    assert t.functions[0].durations_ms is None and t.functions[0].memory_mb is None


def test_companion_paths():
    assert companion_paths(Path("/d/70_inv.csv")) == (Path("/d/70_run.csv"), Path("/d/70_mem.csv"))
    with pytest.raises(TraceFormatError, match="companion"):
        companion_paths(Path("/d/trace.csv"))


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (["Function,App,Owner,1", "f,f,f,1"], r"t_inv.csv:1: header starts"),
        (
            ["HashFunction,HashApp,HashOwner,minute_1", "f,f,f,1,2"],
            r":2: 5 fields, the header has 4",
        ),
        (["HashFunction,HashApp,HashOwner,minute_1", "f,f,f,x"], r":2: .*not an integer"),
        (["HashFunction,HashApp,HashOwner,minute_1", "f,f,f,-1"], r":2: negative"),
        (["HashFunction,HashApp,HashOwner,minute_1", "f,f,f,1", "f,f,f,2"], r":3: .*twice"),
        (["HashFunction,HashApp,HashOwner,minute_1"], r"no data rows"),
        (["HashFunction,HashApp,HashOwner"], r"no per-minute columns"),
    ],
)
def test_malformed_invocation_files_say_where(tmp_path, rows, match):
    with pytest.raises(TraceFormatError, match=match):
        load_azure(write(tmp_path / "t_inv.csv", rows))


def test_malformed_runtime_files_say_where(tmp_path):
    inv = write(tmp_path / "t_inv.csv", ["HashFunction,HashApp,HashOwner,minute_1", "f1,f1,f1,1"])
    run = tmp_path / "t_run.csv"
    write(run, [RUN_HEADER, "f1,f1,f1,5,100,10.0,900.0,10,20,50,40,200,800,900"])
    with pytest.raises(TraceFormatError, match=r"t_run.csv:2: percentiles decrease"):
        load_azure(inv)
    write(run, ["HashFunction,Average", "f1,3"])
    with pytest.raises(TraceFormatError, match=r"t_run.csv:1: missing column\(s\) percentile_"):
        load_azure(inv)
    write(run, [RUN_HEADER, "f1,f1,f1,5,abc,10.0,900.0,10,20,50,100,200,800,900"])
    with pytest.raises(TraceFormatError, match=r"t_run.csv:2: not a number"):
        load_azure(inv)


def test_missing_trace_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="trace file not found"):
        load_azure(tmp_path / "nope_inv.csv")


# --- CDFs ------------------------------------------------------------------------------------


@needs_cdfs
def test_serverlessbench_cdfs_load_and_sample_within_their_range():
    cdfs = load_serverlessbench()
    rng = random.Random(7)
    for cdf, lo, hi in (
        (cdfs.invokes_per_day, 1, 128592666),
        (cdfs.exec_time_ms, 0, 1571585),
        (cdfs.memory_mb, 0, 1460),
    ):
        draws = [cdf.sample(rng) for _ in range(2000)]
        assert lo <= min(draws) and max(draws) <= hi
        assert cdf.inverse(0.0) == cdf.xs[0] and cdf.inverse(1.0) == cdf.xs[-1]
        us = sorted(rng.random() for _ in range(200))
        values = [cdf.inverse(u) for u in us]
        assert values == sorted(values)  # an inverse CDF is monotone
    # The median of memCDF's per-app average allocation is in the low hundreds of MB.
    assert 50 < cdfs.memory_mb.inverse(0.5) < 400


def test_cdf_inverse_interpolates_between_points(tmp_path):
    cdf = EmpiricalCdf.from_csv(write(tmp_path / "c.csv", ["0,0.0", "10, 0.5", "20, 1.000000"]))
    assert cdf.inverse(0.25) == pytest.approx(5.0)
    assert cdf.inverse(0.75) == pytest.approx(15.0)


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (["1,0.5", "2,0.4", "3,1"], r"c.csv:2: x or F decreases"),
        (["1,0.5", "2,0.9"], r"ends at F=0.9"),
        (["1,1.5"], r"outside \[0, 1\]"),
        (["a,b"], r"c.csv:1: not numbers"),
        (["5"], r"c.csv:1: expected 'x,F'"),
        ([""], r"no data"),
    ],
)
def test_malformed_cdfs_are_refused(tmp_path, lines, match):
    with pytest.raises(TraceFormatError, match=match):
        EmpiricalCdf.from_csv(write(tmp_path / "c.csv", lines))


def test_percentiles_inverse_is_monotone():
    p = Percentiles(average=5, points=((0.0, 1.0), (0.5, 4.0), (0.99, 9.0), (1.0, 30.0)))
    values = [p.inverse(i / 100) for i in range(101)]
    assert values == sorted(values)
    assert values[0] == 1.0 and values[-1] == 30.0


# --- derived traces --------------------------------------------------------------------------


@needs_sample
def test_subset_writes_a_loadable_trio_and_is_reproducible(tmp_path):
    a = subset(SAMPLE, tmp_path / "a", 10, seed=3)
    b = subset(SAMPLE, tmp_path / "b", 10, seed=3)
    assert a.read_bytes() == b.read_bytes()
    t = load_azure(a)
    assert len(t.functions) == 10
    assert all(f.durations_ms is not None and f.memory_mb is not None for f in t.functions)
    full = {f.name: f.counts for f in load_azure(SAMPLE).functions}
    assert all(full[f.name] == f.counts for f in t.functions)


@needs_cdfs
def test_synthesize_draws_an_invocation_file_from_the_cdfs(tmp_path):
    path = synthesize(tmp_path, 30, seed=5)
    assert path.name == "synth30s5_inv.csv"
    t = load_azure(path)
    assert len(t.functions) == 30 and t.minutes == 1440
    assert all(f.invocations >= 1 for f in t.functions)
    assert t.run_path is None and t.mem_path is None
    assert synthesize(tmp_path / "again", 30, seed=5).read_bytes() == path.read_bytes()
