"""Trace readers for the simulator: the Azure Functions 2019 trio and the ServerlessBench CDFs.

Two layouts of the Azure 2019 per-minute trace are accepted, told apart by their header:

- the original (Azure/AzurePublicDataset): ``invocations_per_function_md.anon.dNN.csv`` with
  ``HashOwner,HashApp,HashFunction,Trigger,1..1440``, beside
  ``function_durations_percentiles.anon.dNN.csv`` and ``app_memory_percentiles.anon.dNN.csv``;
- invitro's samples (``N_inv.csv``): ``HashFunction,HashApp,HashOwner,minute_1..minute_1440``,
  beside ``N_run.csv`` and ``N_mem.csv``.

Durations and memory columns are found by name, so either column order works. The companion
files are optional: the simulator draws what is missing from the ServerlessBench CDFs.

Also here, so that the checks of the simulator's verdict can be repeated: ``subset`` (a random
subset of a trio's functions, written as a new trio) and ``synthesize`` (an invocation file whose
per-function daily counts are drawn from ``invokesCDF.csv``). From the shell::

    python -m bench.traces subset --trace 70_inv.csv --functions 35 --seed 2 --out DIR
    python -m bench.traces synth --functions 70 --seed 3 --out DIR
"""

from __future__ import annotations

import argparse
import bisect
import csv
import itertools
import math
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

MINUTES_PER_DAY = 1440

# The percentile columns of each file, as (column name, cumulative probability).
_DURATION_COLUMNS = (
    ("percentile_Average_0", 0.0),
    ("percentile_Average_1", 0.01),
    ("percentile_Average_25", 0.25),
    ("percentile_Average_50", 0.50),
    ("percentile_Average_75", 0.75),
    ("percentile_Average_99", 0.99),
    ("percentile_Average_100", 1.0),
)
_MEMORY_COLUMNS = (
    ("AverageAllocatedMb_pct1", 0.01),
    ("AverageAllocatedMb_pct5", 0.05),
    ("AverageAllocatedMb_pct25", 0.25),
    ("AverageAllocatedMb_pct50", 0.50),
    ("AverageAllocatedMb_pct75", 0.75),
    ("AverageAllocatedMb_pct95", 0.95),
    ("AverageAllocatedMb_pct99", 0.99),
    ("AverageAllocatedMb_pct100", 1.0),
)


class TraceFormatError(ValueError):
    """A trace file that is not in a format this module reads; the message names file and line."""


@dataclass(frozen=True)
class Percentiles:
    """A distribution given by a few (cumulative probability, value) points, e.g. a function's
    p0/p1/p25/p50/p75/p99/p100 execution time. Sampling interpolates linearly between points."""

    average: float
    points: tuple[tuple[float, float], ...]

    def inverse(self, u: float) -> float:
        """The value at cumulative probability u in [0, 1]."""
        return _interpolate(self.points, u)


@dataclass(frozen=True)
class FunctionTrace:
    """One function's row: per-minute invocation counts, and its duration (ms) and its app's
    memory (MB) percentiles where the companion files have them."""

    name: str
    app: str
    owner: str
    counts: tuple[int, ...]
    durations_ms: Percentiles | None = None
    memory_mb: Percentiles | None = None

    @property
    def invocations(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True)
class AzureTrace:
    """A loaded trio. ``run_path``/``mem_path`` are None where the file is absent."""

    inv_path: Path
    run_path: Path | None
    mem_path: Path | None
    minutes: int
    functions: tuple[FunctionTrace, ...]

    @property
    def invocations(self) -> int:
        return sum(f.invocations for f in self.functions)


def companion_paths(inv_path: Path) -> tuple[Path, Path]:
    """Where a trio's durations and memory files are, given its invocations file."""
    name = inv_path.name
    if name.endswith("_inv.csv"):
        stem = name[: -len("_inv.csv")]
        return inv_path.with_name(f"{stem}_run.csv"), inv_path.with_name(f"{stem}_mem.csv")
    if name.startswith("invocations_per_function_md."):
        suffix = name[len("invocations_per_function_md.") :]
        return (
            inv_path.with_name(f"function_durations_percentiles.{suffix}"),
            inv_path.with_name(f"app_memory_percentiles.{suffix}"),
        )
    raise TraceFormatError(
        f"{inv_path}: cannot tell the companion files from this name; expected NAME_inv.csv "
        "(beside NAME_run.csv, NAME_mem.csv) or invocations_per_function_md.anon.dNN.csv"
    )


def load_azure(inv_path: Path | str, minutes: int | None = None) -> AzureTrace:
    """Read an invocations file and, where present beside it, its durations and memory files.

    ``minutes`` keeps only the first that many minutes (and drops functions never invoked in
    them). Raises TraceFormatError on a malformed file and FileNotFoundError if the invocations
    file is absent.
    """
    inv_path = Path(inv_path)
    if not inv_path.is_file():
        raise FileNotFoundError(f"trace file not found: {inv_path}")
    run_path, mem_path = companion_paths(inv_path)
    rows = list(_read_invocations(inv_path))
    if not rows:
        raise TraceFormatError(f"{inv_path}: no data rows")
    width = len(rows[0][3])
    keep = width if minutes is None else max(1, min(width, minutes))
    durations = _read_durations(run_path) if run_path.is_file() else None
    memory = _read_memory(mem_path) if mem_path.is_file() else None
    functions = []
    for name, app, owner, counts in rows:
        counts = counts[:keep]
        if minutes is not None and not any(counts):
            continue
        functions.append(
            FunctionTrace(
                name=name,
                app=app,
                owner=owner,
                counts=counts,
                durations_ms=durations.get(name) if durations is not None else None,
                memory_mb=memory.get(app) if memory is not None else None,
            )
        )
    return AzureTrace(
        inv_path=inv_path,
        run_path=run_path if durations is not None else None,
        mem_path=mem_path if memory is not None else None,
        minutes=keep,
        functions=tuple(functions),
    )


def _read_invocations(path: Path) -> Iterator[tuple[str, str, str, tuple[int, ...]]]:
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise TraceFormatError(f"{path}: empty file")
        header = [h.strip() for h in header]
        if header[:3] == ["HashFunction", "HashApp", "HashOwner"]:
            first, hash_index = 3, (0, 1, 2)
        elif header[:4] == ["HashOwner", "HashApp", "HashFunction", "Trigger"]:
            first, hash_index = 4, (2, 1, 0)
        else:
            raise TraceFormatError(
                f"{path}:1: header starts {','.join(header[:4])!r}; expected "
                "'HashFunction,HashApp,HashOwner,minute_1,...' (invitro sample) or "
                "'HashOwner,HashApp,HashFunction,Trigger,1,...' (Azure 2019 original)"
            )
        width = len(header) - first
        if width < 1:
            raise TraceFormatError(f"{path}:1: no per-minute columns")
        seen: set[str] = set()
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise TraceFormatError(
                    f"{path}:{line}: {len(row)} fields, the header has {len(header)}"
                )
            name, app, owner = (row[i] for i in hash_index)
            if name in seen:
                raise TraceFormatError(f"{path}:{line}: function {name} appears twice")
            seen.add(name)
            try:
                counts = tuple(int(v) for v in row[first:])
            except ValueError as e:
                raise TraceFormatError(
                    f"{path}:{line}: a per-minute count is not an integer: {e}"
                ) from None
            if min(counts) < 0:
                raise TraceFormatError(f"{path}:{line}: negative invocation count")
            yield name, app, owner, counts


def _read_percentile_file(
    path: Path,
    key: str,
    average: str,
    columns: Sequence[tuple[str, float]],
) -> dict[str, Percentiles]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        missing = [c for c in (key, average, *(c for c, _ in columns)) if c not in fields]
        if missing:
            raise TraceFormatError(f"{path}:1: missing column(s) {', '.join(missing)}")
        out: dict[str, Percentiles] = {}
        for line, row in enumerate(reader, start=2):
            try:
                values = [float(row[c]) for c, _ in columns]
                avg = float(row[average])
            except (TypeError, ValueError) as e:
                raise TraceFormatError(f"{path}:{line}: not a number: {e}") from None
            if any(v < 0 or math.isnan(v) for v in values):
                raise TraceFormatError(f"{path}:{line}: negative or NaN percentile")
            if any(b < a for a, b in itertools.pairwise(values)):
                raise TraceFormatError(f"{path}:{line}: percentiles decrease: {values}")
            out[row[key]] = Percentiles(
                average=avg, points=tuple((p, v) for (_, p), v in zip(columns, values, strict=True))
            )
        return out


def _read_durations(path: Path) -> dict[str, Percentiles]:
    """Per function (HashFunction) execution time percentiles in ms."""
    return _read_percentile_file(path, "HashFunction", "Average", _DURATION_COLUMNS)


def _read_memory(path: Path) -> dict[str, Percentiles]:
    """Per app (HashApp) allocated memory percentiles in MB. The file has no p0, so below p1
    sampling returns p1."""
    return _read_percentile_file(path, "HashApp", "AverageAllocatedMb", _MEMORY_COLUMNS)


def _interpolate(points: Sequence[tuple[float, float]], u: float) -> float:
    """Inverse CDF through (F, x) points, linear between them, clamped at both ends."""
    if u <= points[0][0]:
        return points[0][1]
    for (f0, x0), (f1, x1) in itertools.pairwise(points):
        if u <= f1:
            return x0 if f1 == f0 else x0 + (x1 - x0) * (u - f0) / (f1 - f0)
    return points[-1][1]


@dataclass(frozen=True)
class EmpiricalCdf:
    """An empirical CDF given as sorted (x, F(x)) points with F non-decreasing, ending at 1."""

    xs: tuple[float, ...]
    fs: tuple[float, ...]

    @classmethod
    def from_csv(cls, path: Path | str, header: bool = False) -> EmpiricalCdf:
        """Read ``x,F`` lines (spaces after the comma allowed; extra columns ignored)."""
        path = Path(path)
        xs: list[float] = []
        fs: list[float] = []
        with path.open(newline="") as f:
            for line, row in enumerate(csv.reader(f), start=1):
                if header and line == 1:
                    continue
                if not row or not "".join(row).strip():
                    continue
                if len(row) < 2:
                    raise TraceFormatError(f"{path}:{line}: expected 'x,F', got {row!r}")
                try:
                    x, p = float(row[0]), float(row[1])
                except ValueError:
                    raise TraceFormatError(f"{path}:{line}: not numbers: {row!r}") from None
                if not 0.0 <= p <= 1.0:
                    raise TraceFormatError(f"{path}:{line}: F={p} outside [0, 1]")
                if xs and (x < xs[-1] or p < fs[-1]):
                    raise TraceFormatError(f"{path}:{line}: x or F decreases")
                xs.append(x)
                fs.append(p)
        if not xs:
            raise TraceFormatError(f"{path}: no data")
        if abs(fs[-1] - 1.0) > 1e-6:
            raise TraceFormatError(f"{path}: the CDF ends at F={fs[-1]}, not 1")
        return cls(tuple(xs), tuple(fs))

    def inverse(self, u: float) -> float:
        """The smallest x with F(x) >= u, interpolated linearly from the previous point so that
        values floored to a grid (5 ms, 5 MB) come back spread over the grid step."""
        i = bisect.bisect_left(self.fs, u)
        if i == 0:
            return self.xs[0]
        if i >= len(self.xs):
            return self.xs[-1]
        f0, f1 = self.fs[i - 1], self.fs[i]
        x0, x1 = self.xs[i - 1], self.xs[i]
        return x1 if f1 == f0 else x0 + (x1 - x0) * (u - f0) / (f1 - f0)

    def sample(self, rng: random.Random) -> float:
        return self.inverse(rng.random())


@dataclass(frozen=True)
class ServerlessBenchCdfs:
    """The ServerlessBench Testcase 11 CDFs: per-app daily invocations, per-function average
    execution time (ms), per-app average allocated memory (MB)."""

    invokes_per_day: EmpiricalCdf
    exec_time_ms: EmpiricalCdf
    memory_mb: EmpiricalCdf


def default_cdf_dir() -> Path:
    return Path(__file__).resolve().parents[1] / ".." / "shared" / "traces" / "serverlessbench-cdfs"


def load_serverlessbench(directory: Path | str | None = None) -> ServerlessBenchCdfs:
    d = Path(directory) if directory is not None else default_cdf_dir()
    for name in ("invokesCDF.csv", "execTimeCDF.csv", "memCDF.csv"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"ServerlessBench CDF {name} not found in {d}")
    return ServerlessBenchCdfs(
        invokes_per_day=EmpiricalCdf.from_csv(d / "invokesCDF.csv"),
        exec_time_ms=EmpiricalCdf.from_csv(d / "execTimeCDF.csv"),
        memory_mb=EmpiricalCdf.from_csv(d / "memCDF.csv"),
    )


def subset(inv_path: Path | str, out_dir: Path | str, n: int, seed: int) -> Path:
    """Write a random n-function subset of a trio (same rows, same columns) to out_dir; returns
    the new invocations file. Rows of the companion files are kept for the chosen functions."""
    inv_path, out_dir = Path(inv_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with inv_path.open(newline="") as f:
        rows = list(csv.reader(f))
    header, data = rows[0], [r for r in rows[1:] if r]
    if not 0 < n <= len(data):
        raise ValueError(f"subset of {n} from {len(data)} functions")
    chosen = random.Random(seed).sample(data, n)
    key = 0 if header[0] == "HashFunction" else 2
    names = {r[key] for r in chosen}
    apps = {r[1] for r in chosen}
    stem = f"sub{n}s{seed}"
    out_inv = out_dir / f"{stem}_inv.csv"
    _write_rows(out_inv, header, chosen)
    run_path, mem_path = companion_paths(inv_path)
    for src, dst, col, wanted in (
        (run_path, out_dir / f"{stem}_run.csv", "HashFunction", names),
        (mem_path, out_dir / f"{stem}_mem.csv", "HashApp", apps),
    ):
        if src.is_file():
            with src.open(newline="") as f:
                rows = list(csv.reader(f))
            i = rows[0].index(col)
            _write_rows(dst, rows[0], [r for r in rows[1:] if r and r[i] in wanted])
    return out_inv


def synthesize(
    out_dir: Path | str,
    n: int,
    seed: int,
    minutes: int = MINUTES_PER_DAY,
    cdfs: ServerlessBenchCdfs | None = None,
    max_per_day: int = 150_000,
) -> Path:
    """Write ``synth{n}s{seed}_inv.csv`` (invitro layout, no companion files) and return its path.

    Each function's daily count is drawn from invokesCDF (per-app counts, used per function;
    at least 1; capped at ``max_per_day`` to keep a simulated day short). Its arrival pattern is
    drawn too, as the Azure 2019 characterisation found a mix of triggers: 30% timer-like
    (periodic, random phase), 50% Poisson at a constant rate, 20% bursty (the same daily count
    packed into a few on-periods). These shares are assumptions, not measured values.
    """
    cdfs = cdfs or load_serverlessbench()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        daily = max(1, min(max_per_day, round(cdfs.invokes_per_day.sample(rng))))
        expected = daily * minutes / MINUTES_PER_DAY
        kind = rng.random()
        counts = [0] * minutes
        if kind < 0.3:
            period = max(1, round(MINUTES_PER_DAY / daily))
            per_fire = max(1, round(daily * period / MINUTES_PER_DAY))
            for m in range(rng.randrange(period), minutes, period):
                counts[m] = per_fire
        elif kind < 0.8:
            rate = expected / minutes
            counts = [_poisson(rng, rate) for _ in range(minutes)]
        else:
            bursts = rng.randint(1, 6)
            length = rng.randint(5, 60)
            rate = expected / max(1, bursts * length)
            for _ in range(bursts):
                start = rng.randrange(minutes)
                for m in range(start, min(minutes, start + length)):
                    counts[m] += _poisson(rng, rate)
        if not any(counts):
            counts[rng.randrange(minutes)] = 1
        name = f"synth{seed:04d}f{i:05d}"
        rows.append([name, name, name, *map(str, counts)])
    header = ["HashFunction", "HashApp", "HashOwner", *(f"minute_{m + 1}" for m in range(minutes))]
    path = out_dir / f"synth{n}s{seed}_inv.csv"
    _write_rows(path, header, rows)
    return path


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 50:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    # Knuth's method: fine for the small per-minute rates it sees here.
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _write_rows(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.traces", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_sub = sub.add_parser("subset", help="random subset of a trio's functions")
    p_sub.add_argument("--trace", type=Path, required=True)
    p_syn = sub.add_parser("synth", help="invocations drawn from the ServerlessBench CDFs")
    for p in (p_sub, p_syn):
        p.add_argument("--functions", type=int, required=True)
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "subset":
        print(subset(args.trace, args.out, args.functions, args.seed))
    else:
        print(synthesize(args.out, args.functions, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
