"""The adaptive resource policy: how long snapshots stay, what is evicted, what is admitted,
and how large each tenant's limits are.

The policy is a pure object in the style of a sans-I/O protocol core: it never reads a clock,
a file or a cgroup, and it draws no random numbers. Events and measurements go in, frozen
decision objects come out, and the daemon (later) and the trace simulator in bench/ (now) are
thin shells that carry them out. Identical inputs give identical decisions.

Who calls what, and where:

- request path, O(1) and a few microseconds: ``on_invocation(fn, now)`` when an invocation
  starts, ``on_idle(fn, now)`` when a function has nothing in flight any more, and
  ``admit(fn, needed_bytes, now)`` before memory is committed (a snapshot rebuild or a fork)
  when the host may be full;
- a periodic timer, off the request path: ``decide(now)``, which returns the decisions that are
  due; ``next_wakeup()`` says when calling it next is useful;
- measurements, whenever they are taken: ``observe_cost`` (rebuild time, snapshot and worker
  USS/PSS), ``observe_memory`` (host and tenant readings), ``observe_workers`` (idle workers).

What the policy owns: each snapshot's lifetime (keep-alive and pre-warm, from the function's
idle-time histogram, after Shahrad et al., "Serverless in the Wild", USENIX ATC 2020), the
eviction order under memory pressure (Greedy-Dual, after Fuerst and Sharma, "FaasCache",
ASPLOS 2021), admission (refuse with a reason rather than overcommit), and tenant memory.high
and cpu.weight. Workers are the scheduler core's: forking one costs ~2 ms, so they live on a
short fixed timer plus spares there; the policy only evicts idle workers, before any snapshot,
when memory is short.

The baselines the simulator compares against (fixed keep-alive, never unload, LRU with a TTL
under a memory cap) are subclasses that change only the keep-alive windows and the eviction
order, so every policy runs through the same code.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hourai.units import format_size

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class PolicyParams:
    """Every constant the policy uses. Defaults follow the published policies where one exists.

    Keep-alive and pre-warm (hybrid histogram, Shahrad et al. 2020, section 4.2):

    - ``bin_s``, ``range_s``: the idle-time histogram has 1-minute bins over 4 hours (240 bins);
      idle times beyond the range are counted as out of bound (OOB).
    - ``linger_s``: after going idle a snapshot always stays this long (one bin), where the
      paper unloads at once when it plans a pre-warm. Idle times this short are the commonest
      (the gaps inside a burst) and the cheapest to cover. The percentiles below are then
      taken over the idle times that outlast the linger: a function invoked in bursts every
      15 minutes has a 5th percentile of seconds over all its idle times, which keeps it
      loaded all the time, but of ~15 minutes over the idle times that matter, so its
      snapshot can go between bursts and come back just before the next one.
    - ``head_percentile``, ``tail_percentile``: the snapshot is pre-warmed at the 5th percentile
      of idle times and kept until the 99th.
    - ``histogram_margin``: 10%: the pre-warm point moves 10% earlier, the end of the keep-alive
      window 10% later, to absorb error in the distribution.
    - ``cv_threshold``: the histogram is representative only if the coefficient of variation of
      its bin counts is at least 2 (a flat histogram, CV near 0, predicts nothing).
    - ``min_samples``: idle times (of those outlasting the linger) needed before the histogram
      is trusted at all; until then the fallback applies. The paper sets no minimum, but its CV
      test cannot tell a few scattered idle times from a peak (k samples in k distinct bins
      have CV = sqrt(240/k - 1) or so, above 2 for any k < 48), and with n idle times seen the
      next one falls inside their range only with probability (n-1)/(n+1): 0 after one,
      2/3 after five. Five costs at most five fallback periods per function, once (the history
      persists). bench/simulate.py also runs 1 (the paper's rule) and 20 to show the trade-off.
    - ``fallback_keep_alive_s``: while it is not representative, keep alive for the whole range
      (4 hours) without pre-warming: the paper's conservative fallback.
    - ``oob_threshold``: when at least half of the idle times are beyond the range, predict the
      next idle time instead (``forecast_*``).
    - ``forecast_alpha``, ``forecast_margin``: the paper fits an ARIMA model to the idle times;
      here the forecast is simple exponential smoothing, which is the one-step forecast of an
      ARIMA(0,1,1) model with its MA coefficient fixed at ``alpha - 1``. It needs one float of
      state and no fitting (a fitted ARIMA needs the raw series and milliseconds of numerical
      work per update, and these functions are, by definition, invoked a few times a day).
      Pre-warm at 85% of the forecast and keep alive for 2 x 15% of it, as in the paper.
    - ``histogram_max_samples``: when the histogram holds this many idle times all counts are
      halved, so the counters stay small and old behaviour fades.
    - ``min_keep_alive_s``, ``max_keep_alive_s``, ``max_prewarm_s``: bounds on every window.

    Eviction (Greedy-Dual, FaasCache): priority = clock + frequency x cost / size, with cost the
    measured rebuild seconds and size the measured snapshot USS in GiB; the lowest goes first.
    ``default_rebuild_s``, ``default_snapshot_bytes``, ``default_worker_bytes`` stand in until a
    measurement arrives.

    Memory: the budget is ``memory_budget_bytes`` (config; None = no fixed budget) and at most
    ``host_memory_fraction`` of the memory the host reports. Above ``high_watermark`` x budget,
    ``decide`` evicts (idle workers first, then idle snapshots) down to ``low_watermark`` x
    budget. ``admit`` evicts just enough to stay within the budget, or refuses.

    Tenant limits: memory.high = the larger of the ``memory_high_percentile`` of the tenant's
    observed working set and its latest reading, plus ``memory_high_headroom``; at least
    ``memory_high_min_bytes`` and never above the declared maximum. It is recomputed every
    ``tenant_resize_interval_s`` and changed only when it moves by more than
    ``resize_hysteresis``, except upwards: a reading that eats into half the headroom raises it
    at the next ``decide``, so the limit never throttles a tenant below what it uses (a deploy
    adds a snapshot's worth at once, and a history of quiet days says nothing about that).

    cpu.weight is never sized from use. A weight from past use takes a light tenant's share
    exactly when a busy tenant needs the CPU: measured, a 40 ms call beside a CPU hog took
    65-96x its time alone with weights 1-2 against 172-425, and 1.4x with equal weights. So every
    tenant gets ``cpu_weight_default`` (the equal share), or its declared weight when that is
    higher (capacity reserved for it); the policy never writes a weight below the default
    (``cpu_demand_halflife_s`` only smooths the demand shown by ``tenant_stats``).
    """

    bin_s: float = 60.0
    range_s: float = 4 * 3600.0
    linger_s: float = 60.0
    head_percentile: float = 5.0
    tail_percentile: float = 99.0
    histogram_margin: float = 0.10
    cv_threshold: float = 2.0
    min_samples: int = 5
    fallback_keep_alive_s: float = 4 * 3600.0
    oob_threshold: float = 0.5
    forecast_alpha: float = 0.5
    forecast_margin: float = 0.15
    histogram_max_samples: int = 1024
    min_keep_alive_s: float = 60.0
    max_keep_alive_s: float = 4 * 3600.0
    max_prewarm_s: float = 24 * 3600.0

    default_rebuild_s: float = 0.1
    default_snapshot_bytes: int = 64 * MiB
    default_worker_bytes: int = 1 * MiB

    memory_budget_bytes: int | None = None
    host_memory_fraction: float = 0.9
    high_watermark: float = 0.95
    low_watermark: float = 0.85

    memory_high_percentile: float = 99.0
    memory_high_headroom: float = 0.25
    memory_high_min_bytes: int = 64 * MiB
    tenant_resize_interval_s: float = 30.0
    resize_hysteresis: float = 0.10
    cpu_weight_default: int = 100
    cpu_demand_halflife_s: float = 60.0

    def __post_init__(self) -> None:
        checks = [
            (self.bin_s > 0 and self.range_s >= self.bin_s, "need 0 < bin_s <= range_s"),
            (0 <= self.linger_s < self.range_s, "need 0 <= linger_s < range_s"),
            (
                0 <= self.head_percentile < self.tail_percentile <= 100,
                "need 0 <= head < tail <= 100",
            ),
            (0 <= self.histogram_margin < 1, "histogram_margin must be in [0, 1)"),
            (0 <= self.forecast_margin < 0.5, "forecast_margin must be in [0, 0.5)"),
            (0 < self.forecast_alpha <= 1, "forecast_alpha must be in (0, 1]"),
            (0 < self.oob_threshold <= 1, "oob_threshold must be in (0, 1]"),
            (self.min_samples >= 1, "min_samples must be >= 1"),
            (self.histogram_max_samples >= 2, "histogram_max_samples must be >= 2"),
            (0 <= self.min_keep_alive_s <= self.max_keep_alive_s, "need min <= max keep-alive"),
            (0 < self.low_watermark <= self.high_watermark <= 1, "need 0 < low <= high <= 1"),
            (0 < self.host_memory_fraction <= 1, "host_memory_fraction must be in (0, 1]"),
            (1 <= self.cpu_weight_default <= 10000, "cpu_weight_default must be in 1..10000"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"PolicyParams: {message}")

    @property
    def n_bins(self) -> int:
        return math.ceil(self.range_s / self.bin_s)

    @property
    def linger_bins(self) -> int:
        """Bins below this index hold only idle times shorter than the linger."""
        return math.ceil(self.linger_s / self.bin_s)


# --- decisions -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnloadSnapshot:
    """Stop the function's snapshot (and with it its idle workers and spares)."""

    fn: str
    reason: str


@dataclass(frozen=True, slots=True)
class PrewarmSnapshot:
    """Rebuild the function's snapshot now, before the invocation the histogram expects."""

    fn: str
    reason: str


@dataclass(frozen=True, slots=True)
class EvictWorkers:
    """Stop up to ``count`` idle workers (spares included) of the function, oldest first."""

    fn: str
    count: int
    reason: str


@dataclass(frozen=True, slots=True)
class SetTenantMemoryHigh:
    """Write ``memory_high`` bytes to the tenant cgroup's memory.high."""

    tenant: str
    memory_high: int


@dataclass(frozen=True, slots=True)
class SetTenantCpuWeight:
    """Write ``weight`` to the tenant cgroup's cpu.weight (never below the default)."""

    tenant: str
    weight: int


Decision = (
    UnloadSnapshot | PrewarmSnapshot | EvictWorkers | SetTenantMemoryHigh | SetTenantCpuWeight
)


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer to ``admit``. If ``ok``, carry out ``evictions`` first, then commit the memory;
    if not, refuse the work (503) with ``reason``."""

    ok: bool
    reason: str
    evictions: tuple[Decision, ...] = ()


@dataclass(frozen=True, slots=True)
class Windows:
    """A snapshot's plan for one idle period, in seconds from the moment the function went idle.

    With ``prewarm_s`` 0 the snapshot stays loaded until ``keep_alive_s``. Otherwise it stays
    for ``linger_s``, is unloaded, pre-warmed at ``prewarm_s`` (> ``linger_s``) and kept for
    ``keep_alive_s`` more (the paper's keep-alive window, which starts at the pre-warm)."""

    linger_s: float
    prewarm_s: float
    keep_alive_s: float
    source: str

    @property
    def unload_at_s(self) -> float:
        """When the snapshot goes for good if nothing comes (inf: never)."""
        return self.prewarm_s + self.keep_alive_s


@dataclass(frozen=True, slots=True)
class TenantUsage:
    """One reading of a tenant cgroup: memory.current (bytes) and cumulative CPU seconds."""

    memory_bytes: int
    cpu_seconds: float


# --- per-function state ----------------------------------------------------------------------


# What FunctionHistory counts, as persisted and shown by explain().
_COUNTERS = (
    "invocations",
    "cold_starts",
    "prewarms",
    "prewarm_hits",
    "prewarms_skipped",
    "unloads",
    "evictions",
    "rejections",
)


class FunctionHistory:
    """What the policy learns about one function, persisted with the registry.

    A fixed-size idle-time histogram (one 32-bit counter per bin), the out-of-bound count, the
    forecast, the measured costs and a few counters: about 1 KiB however long the function
    lives, and ``to_dict`` is plain ints, floats and strings (JSON and msgpack safe).
    """

    __slots__ = (
        "bins",
        "cold_starts",
        "evictions",
        "forecast_s",
        "in_range",
        "invocations",
        "last_eviction",
        "oob",
        "prewarm_hits",
        "prewarms",
        "prewarms_skipped",
        "rebuild_s",
        "rejections",
        "samples",
        "snapshot_bytes",
        "sumsq",
        "unloads",
        "version",
        "worker_bytes",
    )

    def __init__(self, n_bins: int) -> None:
        self.bins = array("I", bytes(4 * n_bins))
        self.in_range = 0  # sum of bins
        self.sumsq = 0  # sum of squared bin counts, kept so the CV is O(1)
        self.oob = 0
        self.forecast_s: float | None = None
        self.samples = 0  # idle times ever recorded (not aged)
        self.version = 0  # bumps on every change that can move the windows
        self.rebuild_s: float | None = None
        self.snapshot_bytes: int | None = None
        self.worker_bytes: int | None = None
        self.invocations = 0
        self.cold_starts = 0
        self.prewarms = 0
        self.prewarm_hits = 0
        self.prewarms_skipped = 0
        self.unloads = 0
        self.evictions = 0
        self.rejections = 0
        self.last_eviction = ""

    def record_idle(self, idle_s: float, p: PolicyParams) -> None:
        """Add one idle time (seconds from going idle to the next invocation)."""
        b = int(idle_s // p.bin_s) if idle_s > 0 else 0
        if b < len(self.bins):
            c = self.bins[b]
            self.bins[b] = c + 1
            self.sumsq += 2 * c + 1
            self.in_range += 1
        else:
            self.oob += 1
        long = idle_s >= p.linger_s
        if long:
            # The forecast is only ever asked about the idle times that outlast the linger.
            f = self.forecast_s
            self.forecast_s = idle_s if f is None else f + p.forecast_alpha * (idle_s - f)
        self.samples += 1
        if self.in_range + self.oob >= p.histogram_max_samples:
            self._age()
            long = True
        # The windows read only the bins past the linger, the OOB count and the forecast: an
        # idle time shorter than the linger (most of a busy function's) cannot move them.
        if long or b >= p.linger_bins or self.samples == 1:
            self.version += 1

    def _age(self) -> None:
        bins = self.bins
        for i, c in enumerate(bins):
            if c:
                bins[i] = c >> 1
        self.in_range = sum(bins)
        self.sumsq = sum(c * c for c in bins)
        self.oob >>= 1

    def count_from(self, start: int) -> int:
        """In-range idle times in bins ``start`` and up."""
        return self.in_range - sum(self.bins[:start])

    def cv(self, start: int = 0) -> float:
        """Coefficient of variation of the counts of bins ``start`` and up (0 if all empty).
        O(start): the sum of squares is kept incrementally."""
        bins = self.bins
        n = len(bins) - start
        head = bins[:start]
        s = self.in_range - sum(head)
        if s <= 0 or n < 2:
            return 0.0
        sumsq = self.sumsq - sum(c * c for c in head)
        mean = s / n
        var = max(0.0, (sumsq - s * s / n) / (n - 1))
        return math.sqrt(var) / mean

    def percentile_bin(self, pct: float, start: int = 0) -> int:
        """The first bin (from ``start``) at which the cumulative count of bins ``start`` and
        up reaches pct percent of their total."""
        bins = self.bins
        target = pct / 100.0 * self.count_from(start)
        acc = 0
        for i in range(start, len(bins)):
            c = bins[i]
            acc += c
            if c and acc >= target:
                return i
        return len(bins) - 1

    def to_dict(self) -> dict[str, Any]:
        # Only non-zero bins: most functions' histograms are sparse.
        return {
            "v": 1,
            "n_bins": len(self.bins),
            "bins": [[i, c] for i, c in enumerate(self.bins) if c],
            "oob": self.oob,
            "forecast_s": self.forecast_s,
            "samples": self.samples,
            "rebuild_s": self.rebuild_s,
            "snapshot_bytes": self.snapshot_bytes,
            "worker_bytes": self.worker_bytes,
            "counters": {k: getattr(self, k) for k in _COUNTERS},
            "last_eviction": self.last_eviction,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], n_bins: int) -> FunctionHistory:
        """Restore from ``to_dict``. A histogram saved with another bin count is dropped (the
        counts would mean other idle times); costs and counters are kept. Raises ValueError
        on anything malformed."""
        try:
            return cls._from_dict(d, n_bins)
        except (TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"malformed FunctionHistory: {e}") from None

    @classmethod
    def _from_dict(cls, d: Mapping[str, Any], n_bins: int) -> FunctionHistory:
        h = cls(n_bins)
        if d.get("v") != 1:
            raise ValueError(f"unknown FunctionHistory version {d.get('v')!r}")
        if d.get("n_bins") == n_bins:
            for i, c in d.get("bins", []):
                if 0 <= int(i) < n_bins and int(c) > 0:
                    h.bins[int(i)] = min(int(c), 0xFFFFFFFF)
            h.in_range = sum(h.bins)
            h.sumsq = sum(c * c for c in h.bins)
            h.oob = max(0, int(d.get("oob", 0)))
            f = d.get("forecast_s")
            h.forecast_s = float(f) if f is not None and math.isfinite(float(f)) else None
        h.samples = max(0, int(d.get("samples", 0)))
        h.rebuild_s = _opt_float(d.get("rebuild_s"))
        h.snapshot_bytes = _opt_int(d.get("snapshot_bytes"))
        h.worker_bytes = _opt_int(d.get("worker_bytes"))
        for k, v in dict(d.get("counters", {})).items():
            if k in _COUNTERS:
                setattr(h, k, max(0, int(v)))
        h.last_eviction = str(d.get("last_eviction", ""))[:200]
        return h


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


class _Fn:
    """Runtime state of one function (rebuilt on restart; only ``history`` persists)."""

    __slots__ = (
        "busy",
        "cost_per_size",
        "freq",
        "gen",
        "history",
        "idle_since",
        "idle_workers",
        "last_use",
        "loaded",
        "name",
        "pending",
        "prewarmed",
        "priority",
        "tenant",
        "win",
        "win_version",
    )

    def __init__(self, name: str, tenant: str, history: FunctionHistory) -> None:
        self.name = name
        self.tenant = tenant
        self.history = history
        self.busy = False
        self.loaded = False
        self.prewarmed = False  # pre-warmed and not invoked since
        self.idle_since: float | None = None
        self.pending = False  # went idle since the last decide()
        self.gen = 0  # bumped by every invocation: timers of older generations are stale
        self.freq = 0  # invocations since the snapshot was last loaded (Greedy-Dual)
        self.priority = 0.0
        self.cost_per_size: float | None = None  # Greedy-Dual's cost / size, cached
        self.last_use = -math.inf
        self.idle_workers = 0
        self.win: Windows | None = None
        self.win_version = -1


class _Tenant:
    """A tenant's working-set histogram (log-spaced bins, bounded), latest reading, declared
    limits and CPU demand."""

    # 4 bins per doubling from 1 MiB: 19% wide, 96 bins reach 16 TiB.
    BINS_PER_DOUBLING = 4
    N_BINS = 96
    MAX_SAMPLES = 2048

    __slots__ = (
        "applied_weight",
        "cpu_at",
        "cpu_last",
        "current",
        "demand",
        "emitted_high",
        "max_bytes",
        "reserved_weight",
        "samples",
        "ws",
    )

    def __init__(self) -> None:
        self.ws = array("I", bytes(4 * self.N_BINS))
        self.samples = 0
        self.max_bytes: int | None = None
        self.cpu_last: float | None = None
        self.cpu_at = 0.0
        self.demand = 0.0  # cores, exponentially averaged
        self.current: int | None = None  # latest memory reading
        self.emitted_high: int | None = None
        self.reserved_weight: int | None = None  # declared cpu weight
        # What the tenant's cgroup has: the declared weight (or the kernel's default) until
        # the policy writes one.
        self.applied_weight: int | None = None

    def add_memory(self, nbytes: int) -> None:
        ratio = max(nbytes, 1) / MiB
        b = int(self.BINS_PER_DOUBLING * math.log2(ratio)) + 1 if ratio >= 1 else 0
        self.ws[min(b, self.N_BINS - 1)] += 1
        self.samples += 1
        if self.samples >= self.MAX_SAMPLES:
            for i, c in enumerate(self.ws):
                self.ws[i] = c >> 1
            self.samples = sum(self.ws)

    def percentile_bytes(self, pct: float) -> int:
        """Upper edge of the bin holding the pct-th percentile (an overestimate by < 19%)."""
        target = pct / 100.0 * self.samples
        acc = 0
        for i, c in enumerate(self.ws):
            acc += c
            if c and acc >= target:
                return int(MiB * 2 ** (i / self.BINS_PER_DOUBLING))
        return int(MiB * 2 ** ((self.N_BINS - 1) / self.BINS_PER_DOUBLING))


_UNLOAD = 0
_PREWARM = 1


class KeepAlivePolicy:
    """The machinery every policy shares: function table, timers, memory budget, eviction,
    admission and tenant sizing. Subclasses choose ``windows`` (when to unload and pre-warm)
    and the eviction order (``_priority``, lowest first, kept current by ``_touch`` on every
    invocation and ``_evicted`` on every eviction)."""

    name = "keep-alive"

    def __init__(self, params: PolicyParams | None = None) -> None:
        self.params = params or PolicyParams()
        self._fns: dict[str, _Fn] = {}
        self._pending: list[_Fn] = []
        self._timers: list[tuple[float, int, int, int, _Fn]] = []
        self._seq = 0
        self._used = 0
        self._set_host_total(None)
        self._tenants: dict[str, _Tenant] = {}
        self._tenants_dirty = False
        self._tenants_urgent = False  # a memory.high must rise before the next resize
        self._next_resize = -math.inf
        self.counters: dict[str, int] = {
            "decide_calls": 0,
            "unloads": 0,
            "prewarms": 0,
            "prewarms_skipped": 0,
            "pressure_evictions": 0,
            "worker_evictions": 0,
            "admissions": 0,
            "admission_evictions": 0,
            "rejections": 0,
        }

    # --- functions ----------------------------------------------------------------------------

    def register(
        self, fn: str, tenant: str = "default", state: Mapping[str, Any] | None = None
    ) -> None:
        """Make a function known, optionally with the history ``export_state`` saved earlier.
        Unknown functions are also registered implicitly (tenant "default") on first event."""
        history = (
            FunctionHistory.from_dict(state, self.params.n_bins)
            if state is not None
            else FunctionHistory(self.params.n_bins)
        )
        old = self._fns.get(fn)
        st = _Fn(fn, tenant, history)
        if old is not None:
            st.busy, st.loaded, st.idle_since = old.busy, old.loaded, old.idle_since
            st.idle_workers = old.idle_workers
        self._fns[fn] = st

    def export_state(self, fn: str) -> dict[str, Any]:
        """The function's persistent state, for the registry (JSON/msgpack safe). It holds
        durations and counts only, no timestamps, so it means the same after a restart."""
        return self._known(fn).history.to_dict()

    def forget(self, fn: str) -> None:
        """The function was removed: drop its state (its timers become stale)."""
        st = self._fns.pop(fn, None)
        if st is not None:
            st.gen += 1
            st.pending = False

    def functions(self) -> list[str]:
        return list(self._fns)

    def _known(self, fn: str) -> _Fn:
        st = self._fns.get(fn)
        if st is None:
            raise KeyError(f"unknown function {fn!r}")
        return st

    def _get(self, fn: str) -> _Fn:
        st = self._fns.get(fn)
        if st is None:
            st = self._fns[fn] = _Fn(fn, "default", FunctionHistory(self.params.n_bins))
        return st

    # --- events (request path) ----------------------------------------------------------------

    def on_invocation(self, fn: str, now: float) -> None:
        """An invocation of ``fn`` starts at ``now``. O(1)."""
        st = self._fns.get(fn) or self._get(fn)
        h = st.history
        h.invocations += 1
        if st.idle_since is not None:
            h.record_idle(now - st.idle_since, self.params)
            st.idle_since = None
        if not st.loaded:
            # The shell had to rebuild the snapshot to serve this: a cold start.
            h.cold_starts += 1
            st.loaded = True
            st.freq = 0
        elif st.prewarmed:
            h.prewarm_hits += 1
        st.prewarmed = False
        st.busy = True
        st.gen += 1
        st.freq += 1
        st.last_use = now
        self._touch(st)

    def on_idle(self, fn: str, now: float) -> None:
        """``fn`` has no invocation in flight any more (its last one ended at ``now``). O(1);
        the keep-alive decision is taken by the next ``decide``."""
        st = self._fns.get(fn) or self._get(fn)
        if not st.busy:
            return
        st.busy = False
        st.idle_since = now
        if not st.pending:
            st.pending = True
            self._pending.append(st)

    def on_unloaded(self, fn: str, now: float) -> None:
        """The snapshot is gone for a reason the policy did not decide (crash, redeploy, a
        failed pre-warm). Its pending timers are cancelled."""
        st = self._fns.get(fn)
        if st is None:
            return
        st.loaded = False
        st.prewarmed = False
        st.busy = False
        st.idle_workers = 0
        st.freq = 0
        st.gen += 1

    # --- measurements -------------------------------------------------------------------------

    def observe_cost(
        self,
        fn: str,
        rebuild_seconds: float | None = None,
        snapshot_bytes: int | None = None,
        worker_bytes: int | None = None,
    ) -> None:
        """Measured costs: time to rebuild the snapshot, its unique memory (USS or PSS, not
        RSS: shared pages are not freed by evicting it), and one worker's unique memory."""
        st = self._get(fn)
        st.cost_per_size = None
        h = st.history
        if rebuild_seconds is not None and rebuild_seconds >= 0:
            h.rebuild_s = float(rebuild_seconds)
        if snapshot_bytes is not None and snapshot_bytes >= 0:
            h.snapshot_bytes = int(snapshot_bytes)
        if worker_bytes is not None and worker_bytes >= 0:
            h.worker_bytes = int(worker_bytes)

    def observe_workers(self, fn: str, idle: int) -> None:
        """How many idle workers (spares included) ``fn`` has now; read only under pressure."""
        self._get(fn).idle_workers = max(0, int(idle))

    def observe_memory(
        self,
        now: float,
        used_bytes: int,
        total_bytes: int | None = None,
        tenants: Mapping[str, TenantUsage] | None = None,
    ) -> None:
        """A memory reading: ``used_bytes`` charged to hourai's functions (the sum of the tenant
        cgroups, or of snapshot and worker USS), ``total_bytes`` what the host (or the daemon's
        own cgroup) can give, and optionally per-tenant usage for limit sizing."""
        self._used = max(0, int(used_bytes))
        if total_bytes is not None:
            self._set_host_total(int(total_bytes))
        if tenants:
            half = self.params.cpu_demand_halflife_s
            for name, usage in tenants.items():
                t = self._tenants.get(name)
                if t is None:
                    t = self._tenants[name] = _Tenant()
                t.add_memory(usage.memory_bytes)
                t.current = max(0, int(usage.memory_bytes))
                if self._must_rise(t):
                    self._tenants_urgent = True
                if t.cpu_last is not None and now > t.cpu_at:
                    rate = max(0.0, usage.cpu_seconds - t.cpu_last) / (now - t.cpu_at)
                    keep = 0.5 ** ((now - t.cpu_at) / half) if half > 0 else 0.0
                    t.demand = keep * t.demand + (1 - keep) * rate
                t.cpu_last, t.cpu_at = usage.cpu_seconds, now
            self._tenants_dirty = True

    def declare_tenant(
        self, tenant: str, memory_max_bytes: int | None, cpu_weight: int | None = None
    ) -> None:
        """The tenant's declared limits, just written to its cgroup: memory.high never goes
        above ``memory_max_bytes``; a ``cpu_weight`` above the default is capacity reserved
        for it, and stays. The tenant is sized again at the next ``decide`` (a deploy is
        when its use jumps, and the cgroup may have been rewritten without our memory.high)."""
        t = self._tenants.get(tenant)
        if t is None:
            t = self._tenants[tenant] = _Tenant()
        t.max_bytes = memory_max_bytes
        t.reserved_weight = cpu_weight
        t.applied_weight = cpu_weight
        t.emitted_high = None
        self._tenants_dirty = True
        self._next_resize = -math.inf

    def tenant_stats(self) -> dict[str, dict[str, Any]]:
        """What the policy knows of each tenant and what it set, for stats and debugging."""
        p = self.params
        return {
            name: {
                "memory_bytes": t.current,
                "working_set_bytes": (
                    t.percentile_bytes(p.memory_high_percentile) if t.samples else None
                ),
                "memory_high": t.emitted_high,
                "memory_max": t.max_bytes,
                "cpu_demand_cores": round(t.demand, 3),
                "cpu_weight": self._cpu_weight(t),
            }
            for name, t in sorted(self._tenants.items())
        }

    # --- what subclasses choose ---------------------------------------------------------------

    def windows(self, st: _Fn) -> Windows:
        """The plan for ``st``'s next idle period (called only when its history changed)."""
        raise NotImplementedError

    def _touch(self, st: _Fn) -> None:
        """Called on every invocation: update the eviction priority (O(1))."""

    def _priority(self, st: _Fn) -> float:
        return st.last_use

    def _evicted(self, st: _Fn) -> None:
        """Called when memory pressure evicts ``st``'s snapshot."""

    # --- queries ------------------------------------------------------------------------------

    def snapshot_keep_alive(self, fn: str) -> tuple[float, float]:
        """(prewarm_after_s, keep_alive_s) that the next idle period of ``fn`` would get:
        prewarm_after_s 0 means it stays loaded for keep_alive_s; otherwise it is unloaded
        after the linger, pre-warmed at prewarm_after_s and kept keep_alive_s more."""
        w = self._windows(self._known(fn))
        return w.prewarm_s, w.keep_alive_s

    def budget(self) -> float:
        """The memory budget in bytes now (inf when neither config nor host set one)."""
        return self._budget

    def set_memory_budget(self, budget_bytes: int | None) -> None:
        """A new configured budget (a config reload); the next ``decide`` acts on it."""
        self.params = dataclasses.replace(self.params, memory_budget_bytes=budget_bytes)
        self._set_host_total(self._host_total)

    def _set_host_total(self, total: int | None) -> None:
        p = self.params
        self._host_total = total
        b = math.inf if p.memory_budget_bytes is None else float(p.memory_budget_bytes)
        if total is not None:
            b = min(b, total * p.host_memory_fraction)
        self._budget = b
        self._high = b * p.high_watermark  # above this, decide() evicts
        self._low = b * p.low_watermark  # ... down to this

    def used(self) -> int:
        """The policy's estimate of memory in use: the last reading plus what it has admitted
        and minus what it has evicted since."""
        return self._used

    def explain(self, fn: str) -> dict[str, Any]:
        """For stats and debugging: the learned windows and why, costs, what was done and why."""
        st = self._known(fn)
        h = st.history
        w = self._windows(st)
        return {
            "policy": self.name,
            "tenant": st.tenant,
            "windows": {
                "linger_s": w.linger_s,
                "prewarm_s": w.prewarm_s,
                "keep_alive_s": w.keep_alive_s,
                "source": w.source,
            },
            "histogram": {
                "samples": h.samples,
                "in_range": h.in_range,
                "out_of_bound": h.oob,
                "cv": round(h.cv(), 3),
                "head_bin": h.percentile_bin(self.params.head_percentile) if h.in_range else None,
                "tail_bin": h.percentile_bin(self.params.tail_percentile) if h.in_range else None,
                "forecast_s": h.forecast_s,
            },
            "costs": {
                "rebuild_s": h.rebuild_s,
                "snapshot_bytes": h.snapshot_bytes,
                "worker_bytes": h.worker_bytes,
            },
            "state": {
                "loaded": st.loaded,
                "busy": st.busy,
                "idle_since": st.idle_since,
                "idle_workers": st.idle_workers,
                "frequency": st.freq,
                "priority": self._priority(st),
            },
            "counters": h.to_dict()["counters"],
            "last_eviction": h.last_eviction,
        }

    def stats(self) -> dict[str, Any]:
        return {
            "policy": self.name,
            "functions": len(self._fns),
            "loaded": sum(1 for st in self._fns.values() if st.loaded),
            "used_bytes": self._used,
            "budget_bytes": None if math.isinf(self.budget()) else int(self.budget()),
            "timers": len(self._timers),
            **self.counters,
        }

    # --- decisions (timer) --------------------------------------------------------------------

    def next_wakeup(self) -> float:
        """The earliest time at which ``decide`` has something to do (-inf: now; inf: never
        until the next event). A shell may call ``decide`` more often; it is then a no-op."""
        if self._pending or self._used > self._high:
            return -math.inf
        if self._tenants_urgent:
            return -math.inf
        t = self._timers[0][0] if self._timers else math.inf
        if self._tenants_dirty:
            t = min(t, self._next_resize)
        return t

    def decide(self, now: float) -> list[Decision]:
        """Every decision due at ``now``: unloads and pre-warms whose time has come, evictions
        if memory is above the high watermark, and tenant limit changes."""
        self.counters["decide_calls"] += 1
        out: list[Decision] = []
        if self._pending:
            pending, self._pending = self._pending, []
            for st in pending:
                st.pending = False
                if st.busy or not st.loaded or st.idle_since is None:
                    continue
                if self._fns.get(st.name) is not st:
                    continue  # forgotten or re-registered since
                self._plan_idle(st, now, out)
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _, gen, kind, st = heapq.heappop(timers)
            if gen != st.gen or st.busy or self._fns.get(st.name) is not st:
                continue
            if kind == _UNLOAD:
                if st.loaded:
                    self._timed_unload(st, now, out)
            elif not st.loaded:
                self._prewarm(st, when, out)
        if self._used > self._high:
            target = self._used - self._low
            plan, _ = self._plan_evictions(target, exclude=None)
            self._apply(plan, out, "memory pressure")
        if self._tenants_dirty and now >= self._next_resize:
            self._size_tenants(out)
            self._tenants_dirty = False
            self._tenants_urgent = False
            self._next_resize = now + self.params.tenant_resize_interval_s
        elif self._tenants_urgent:
            self._raise_memory_high(out)
            self._tenants_urgent = False
        if len(timers) > 4 * len(self._fns) + 64:
            # Stale entries (their function was invoked since) pile up for busy functions.
            self._timers = [e for e in timers if e[2] == e[4].gen]
            heapq.heapify(self._timers)
        return out

    def _windows(self, st: _Fn) -> Windows:
        v = st.history.version
        if st.win is None or st.win_version != v:
            st.win = self.windows(st)
            st.win_version = v
        return st.win

    def _plan_idle(self, st: _Fn, now: float, out: list[Decision]) -> None:
        """The function just went idle (at ``st.idle_since``): set its timer."""
        w = self._windows(st)
        t0 = st.idle_since
        assert t0 is not None
        if w.prewarm_s > 0 and now < t0 + w.prewarm_s:
            if now >= t0 + w.linger_s:
                self._timed_unload(st, now, out)
            else:
                self._push(t0 + w.linger_s, st, _UNLOAD)
        elif math.isfinite(w.unload_at_s):
            self._push(t0 + w.unload_at_s, st, _UNLOAD)

    def _timed_unload(self, st: _Fn, now: float, out: list[Decision]) -> None:
        """An unload timer fired: either the end of the linger (pre-warm planned) or the end
        of the keep-alive window."""
        w = self._windows(st)
        t0 = st.idle_since if st.idle_since is not None else now
        idle = (now - t0) / 60
        if not st.prewarmed and w.prewarm_s > 0 and now < t0 + w.prewarm_s:
            self._unload(
                st,
                out,
                f"idle {idle:.1f} min; next invocation expected in "
                f"{w.prewarm_s / 60:.1f}-{w.unload_at_s / 60:.1f} min ({w.source}): "
                "pre-warm then",
            )
            self._push(t0 + w.prewarm_s, st, _PREWARM)
            return
        what = "pre-warmed, not invoked" if st.prewarmed else "no invocation"
        self._unload(
            st,
            out,
            f"{what} for {idle:.1f} min: keep-alive until {w.unload_at_s / 60:.1f} min "
            f"({w.source}) over",
        )

    def _push(self, when: float, st: _Fn, kind: int) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, st.gen, kind, st))

    def _snapshot_bytes(self, st: _Fn) -> int:
        b = st.history.snapshot_bytes
        return self.params.default_snapshot_bytes if b is None else b

    def _worker_bytes(self, st: _Fn) -> int:
        b = st.history.worker_bytes
        return self.params.default_worker_bytes if b is None else b

    def _unload(self, st: _Fn, out: list[Decision], reason: str) -> None:
        out.append(UnloadSnapshot(st.name, reason))
        self._used = max(
            0, self._used - self._snapshot_bytes(st) - st.idle_workers * self._worker_bytes(st)
        )
        st.loaded = False
        st.prewarmed = False
        st.idle_workers = 0
        st.freq = 0
        st.history.unloads += 1
        self.counters["unloads"] += 1

    def _prewarm(self, st: _Fn, when: float, out: list[Decision]) -> None:
        w = self._windows(st)
        need = self._snapshot_bytes(st)
        if self._used + need > self._high:
            # A pre-warm is a guess: it may not push memory into eviction territory.
            st.history.prewarms_skipped += 1
            self.counters["prewarms_skipped"] += 1
            return
        out.append(
            PrewarmSnapshot(
                st.name,
                f"{w.prewarm_s / 60:.1f} min idle ({w.source}); keep {w.keep_alive_s / 60:.1f} min",
            )
        )
        self._used += need
        st.loaded = True
        st.prewarmed = True
        st.freq = 0
        st.history.prewarms += 1
        self.counters["prewarms"] += 1
        if math.isfinite(w.keep_alive_s):
            self._push(when + w.keep_alive_s, st, _UNLOAD)

    # --- eviction and admission ---------------------------------------------------------------

    def _plan_evictions(
        self, need: float, exclude: _Fn | None
    ) -> tuple[list[tuple[_Fn, int, int]], int]:
        """Which idle workers, then which idle snapshots, to evict to free ``need`` bytes, in
        eviction order; returns (plan of (fn, workers, 1 if snapshot), bytes freed). If even
        everything evictable is too little, the plan is empty and the bytes are that total.
        O(n log n) in the functions that have something idle; run only when memory is short."""
        plan: list[tuple[_Fn, int, int]] = []
        if need <= 0:
            return plan, 0
        cands = [
            st
            for st in self._fns.values()
            if st is not exclude and (st.idle_workers > 0 or (st.loaded and not st.busy))
        ]
        worker_bytes = [st.idle_workers * self._worker_bytes(st) for st in cands]
        snapshot_bytes = [
            self._snapshot_bytes(st) if st.loaded and not st.busy else 0 for st in cands
        ]
        available = sum(worker_bytes) + sum(snapshot_bytes)
        if available < need:
            return plan, available
        order = sorted(range(len(cands)), key=lambda i: (self._priority(cands[i]), cands[i].name))
        freed = 0
        for i in order:
            if freed >= need:
                return plan, freed
            if worker_bytes[i]:
                plan.append((cands[i], cands[i].idle_workers, 0))
                freed += worker_bytes[i]
        for i in order:
            if freed >= need:
                break
            if snapshot_bytes[i]:
                plan.append((cands[i], 0, 1))
                freed += snapshot_bytes[i]
        return plan, freed

    def _apply(self, plan: list[tuple[_Fn, int, int]], out: list[Decision], why: str) -> None:
        for st, workers, snapshot in plan:
            if snapshot:
                if not st.loaded:
                    continue
                reason = (
                    f"{why}: lowest {self.name} priority ({self._priority(st):.4g}), "
                    f"frees {format_size(self._snapshot_bytes(st), exact=False)}"
                )
                self._evicted(st)
                self._unload(st, out, reason)
                st.gen += 1  # its keep-alive timer is moot
                st.history.evictions += 1
                st.history.last_eviction = reason
                self.counters["pressure_evictions"] += 1
            elif workers and st.idle_workers:
                n = min(workers, st.idle_workers)
                out.append(EvictWorkers(st.name, n, f"{why}: idle workers go before snapshots"))
                self._used = max(0, self._used - n * self._worker_bytes(st))
                st.idle_workers -= n
                self.counters["worker_evictions"] += n

    def admit(self, fn: str, needed_bytes: int, now: float) -> Admission:
        """May ``needed_bytes`` more be committed for ``fn`` (a snapshot rebuild, a fork)?

        Within the budget: yes. Otherwise the evictions that make room (idle workers first, then
        idle snapshots, lowest priority first, never ``fn``'s own) come with the yes; if even
        evicting all of them is not enough, no, with the reason: the shell answers 503 rather
        than let the kernel's OOM killer choose.
        """
        st = self._fns.get(fn) or self._get(fn)
        self.counters["admissions"] += 1
        budget = self._budget
        over = self._used + needed_bytes - budget
        if over <= 0:
            self._used += needed_bytes
            return Admission(True, "within budget")
        plan, freed = self._plan_evictions(over, exclude=st)
        if freed < over:
            # Each tenant is held to its own part of the budget: a tenant still within an
            # equal share (and its own limit) is admitted, so one tenant's use cannot get
            # another's rebuild refused; the kernel's per-tenant limits bound the rest.
            share = self._tenant_share()
            mine = self._tenant_used(st.tenant)
            if share < budget and mine + needed_bytes <= share:
                self._used += needed_bytes
                return Admission(True, f"within tenant {st.tenant}'s share of the budget")
            st.history.rejections += 1
            self.counters["rejections"] += 1
            return Admission(
                False,
                f"memory: {fn} needs {format_size(int(needed_bytes), exact=False)}, "
                f"{format_size(max(0, self._used), exact=False)} of "
                f"{format_size(int(budget), exact=False)} in use, only "
                f"{format_size(max(0, int(freed)), exact=False)} evictable; tenant "
                f"{st.tenant} uses {format_size(int(mine), exact=False)}, its share is "
                f"{format_size(int(share), exact=False)}",
            )
        out: list[Decision] = []
        self._apply(plan, out, f"admitting {fn}")
        self.counters["admission_evictions"] += len(out)
        self._used += needed_bytes
        return Admission(True, f"evicted {len(out)} to make room", tuple(out))

    def _tenant_used(self, tenant: str) -> int:
        """What ``tenant`` holds now: its cgroup's last reading (at most its own limit), or
        what its loaded snapshots and idle workers are known to take, whichever is more."""
        t = self._tenants.get(tenant)
        reading = 0
        if t is not None:
            reading = min(t.current, t.max_bytes) if t.max_bytes is not None else t.current
        known = sum(
            self._snapshot_bytes(st) + st.idle_workers * self._worker_bytes(st)
            for st in self._fns.values()
            if st.tenant == tenant and st.loaded
        )
        return max(reading, known)

    def _tenant_share(self) -> float:
        """An equal part of the budget for every tenant that holds memory now (the whole
        budget while only one does: then the plain budget rule is all there is)."""
        holding = sum(1 for t in self._tenants.values() if t.current > 0)
        return self._budget / max(1, holding)

    # --- tenant limits ------------------------------------------------------------------------

    def _size_tenants(self, out: list[Decision]) -> None:
        p = self.params
        for name in sorted(self._tenants):
            t = self._tenants[name]
            if t.samples:
                high = self._memory_high(t)
                if _moved(t.emitted_high, high, p.resize_hysteresis) or self._must_rise(t):
                    t.emitted_high = high
                    out.append(SetTenantMemoryHigh(name, high))
            weight = self._cpu_weight(t)
            if weight != (p.cpu_weight_default if t.applied_weight is None else t.applied_weight):
                t.applied_weight = weight
                out.append(SetTenantCpuWeight(name, weight))

    def _raise_memory_high(self, out: list[Decision]) -> None:
        """Between resizes: only the tenants whose use caught up with their memory.high."""
        for name in sorted(self._tenants):
            t = self._tenants[name]
            if self._must_rise(t):
                t.emitted_high = self._memory_high(t)
                out.append(SetTenantMemoryHigh(name, t.emitted_high))

    def _memory_high(self, t: _Tenant) -> int:
        p = self.params
        seen = max(t.percentile_bytes(p.memory_high_percentile), t.current or 0)
        high = max(int(seen * (1 + p.memory_high_headroom)), p.memory_high_min_bytes)
        return high if t.max_bytes is None else min(high, t.max_bytes)

    def _must_rise(self, t: _Tenant) -> bool:
        """Whether the latest reading has eaten half the headroom under memory.high (when the
        declared maximum does not already stand there)."""
        if t.emitted_high is None or t.current is None:
            return False
        if t.max_bytes is not None and t.emitted_high >= t.max_bytes:
            return False
        return t.current * (1 + self.params.memory_high_headroom / 2) > t.emitted_high

    def _cpu_weight(self, t: _Tenant) -> int:
        """The equal share, or the reserved weight when that is larger; nothing about past
        use moves it (see PolicyParams)."""
        default = self.params.cpu_weight_default
        return max(default, t.reserved_weight or default)


def _moved(old: int | None, new: int, hysteresis: float) -> bool:
    return old is None or abs(new - old) > hysteresis * old


class AdaptivePolicy(KeepAlivePolicy):
    """hourai's policy: hybrid-histogram keep-alive and pre-warm, Greedy-Dual eviction."""

    name = "hourai"

    def __init__(self, params: PolicyParams | None = None) -> None:
        super().__init__(params)
        self._clock = 0.0  # Greedy-Dual's inflation clock: priority of the last eviction

    def windows(self, st: _Fn) -> Windows:
        p = self.params
        h = st.history
        k0 = p.linger_bins
        n_long = h.count_from(k0) + h.oob  # idle times that outlasted the linger
        if h.samples == 0:
            return Windows(p.linger_s, 0.0, p.fallback_keep_alive_s, "fallback: no idle times yet")
        if n_long == 0:
            # Every idle time so far was shorter than the linger: that is all it gets.
            return Windows(
                p.linger_s, 0.0, max(p.linger_s, p.min_keep_alive_s), "histogram: all idle < linger"
            )
        if n_long < p.min_samples:
            return Windows(p.linger_s, 0.0, p.fallback_keep_alive_s, "fallback: few idle times")
        if h.oob >= p.oob_threshold * n_long and h.forecast_s is not None:
            f = h.forecast_s
            return self._bounded(
                f * (1 - p.forecast_margin),
                f * (1 + p.forecast_margin),
                f"forecast: next idle ~{f / 60:.0f} min",
            )
        if h.cv(k0) < p.cv_threshold:
            return Windows(
                p.linger_s, 0.0, p.fallback_keep_alive_s, "fallback: histogram not representative"
            )
        head = h.percentile_bin(p.head_percentile, k0)
        tail = h.percentile_bin(p.tail_percentile, k0)
        return self._bounded(
            head * p.bin_s * (1 - p.histogram_margin),
            (tail + 1) * p.bin_s * (1 + p.histogram_margin),
            f"histogram: p{p.head_percentile:g} {head} min, p{p.tail_percentile:g} {tail + 1} min",
        )

    def _bounded(self, prewarm: float, until: float, source: str) -> Windows:
        """Windows for 'expect the next invocation between ``prewarm`` and ``until`` seconds
        after going idle', within the configured bounds."""
        p = self.params
        prewarm = min(max(prewarm, 0.0), p.max_prewarm_s)
        if prewarm <= p.linger_s:
            # Unloading for less than nothing: stay loaded through to the end of the window.
            keep = min(max(until, p.linger_s, p.min_keep_alive_s), p.max_keep_alive_s)
            return Windows(p.linger_s, 0.0, keep, source)
        keep = min(max(until - prewarm, p.min_keep_alive_s), p.max_keep_alive_s)
        return Windows(p.linger_s, prewarm, keep, source)

    def _touch(self, st: _Fn) -> None:
        ratio = st.cost_per_size
        if ratio is None:
            h = st.history
            cost = self.params.default_rebuild_s if h.rebuild_s is None else h.rebuild_s
            ratio = st.cost_per_size = cost / (max(self._snapshot_bytes(st), 1) / GiB)
        st.priority = self._clock + st.freq * ratio

    def _priority(self, st: _Fn) -> float:
        return st.priority

    def _evicted(self, st: _Fn) -> None:
        self._clock = max(self._clock, st.priority)


class FixedKeepAlivePolicy(KeepAlivePolicy):
    """Baseline: keep every snapshot for a fixed time after its last invocation, never
    pre-warm, and under a memory cap evict the least recently used first (LRU + TTL)."""

    def __init__(self, keep_alive_s: float, params: PolicyParams | None = None) -> None:
        super().__init__(params)
        self.keep_alive_s = keep_alive_s
        self._windows_fixed = Windows(0.0, 0.0, keep_alive_s, f"fixed {keep_alive_s / 60:g} min")
        self.name = f"fixed-{keep_alive_s / 60:g}m"

    def windows(self, st: _Fn) -> Windows:
        return self._windows_fixed


class NeverUnloadPolicy(FixedKeepAlivePolicy):
    """Baseline: a snapshot, once built, stays (unless memory pressure evicts it, LRU)."""

    def __init__(self, params: PolicyParams | None = None) -> None:
        super().__init__(math.inf, params)
        self._windows_fixed = Windows(0.0, 0.0, math.inf, "never unload")
        self.name = "never-unload"
