"""What every benchmark part shares: the run context, statistics, machine facts and tables."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class BenchContext:
    """Options of one `python -m bench` run, handed to every part's `run(ctx)`."""

    out: Path
    quick: bool = False
    seed: int = 1
    trace: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        """A file in the output dir (created on demand), e.g. for a part's PNG plot."""
        self.out.mkdir(parents=True, exist_ok=True)
        return self.out / name


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0..100) of a non-empty sequence."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summarize(samples_ms: Sequence[float]) -> dict[str, float]:
    """Median, p99, mean and count of latency samples in milliseconds."""
    return {
        "n": len(samples_ms),
        "p50_ms": statistics.median(samples_ms),
        "p99_ms": percentile(samples_ms, 99),
        "mean_ms": statistics.fmean(samples_ms),
        "min_ms": min(samples_ms),
    }


def machine_facts() -> dict[str, object]:
    """The facts a reader needs to judge a figure: cores, memory, kernel, Python, versions."""
    versions = {}
    for dist in (
        "hourai",
        "uvloop",
        "httptools",
        "msgpack",
        "psutil",
        "flask",
        "fastapi",
        "uvicorn",
    ):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_bytes": mem_total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (so it pastes into the README as is)."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
