"""One cgroup per tenant, behind one small interface with three backends.

- ``v2``: the unified hierarchy, through its files (:mod:`hourai.cgroup.v2`).
- ``v1``: the legacy per-controller hierarchies, through cgroupspy (:mod:`hourai.cgroup.v1`).
- ``none``: no containment at all; a loud warning and best-effort accounting
  (:mod:`hourai.cgroup.none`).

:func:`detect` picks the best one this host allows and says why (``backend.describe()``), so
the daemon can log its choice in one line. Tenant groups always live *below the daemon's own
cgroup* (``<own>/<subtree>/<tenant>``), never at a hierarchy's root: the daemon may itself be
a systemd service or a container, and it only owns the part of the tree it was given.

Typical use::

    backend = detect()
    log.info(backend.describe())
    backend.cleanup_stale()                      # groups a crashed run left behind
    backend.create("acme", TenantLimits(memory_max=parse_size("128M"), pids_max=64))
    mark = backend.oom_kill_count("acme")
    ...                                          # a forked child calls backend.join("acme")
    if backend.oom_killed_since("acme", mark):   # the worker died of SIGKILL: was it OOM?
        ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from hourai.units import format_size, parse_cpus, parse_size

__all__ = [
    "DEFAULT_TENANT_LIMITS",
    "CgroupBackend",
    "CgroupError",
    "Mount",
    "TenantLimits",
    "Usage",
    "detect",
    "is_valid_name",
    "read_mounts",
    "read_self_cgroups",
    "validate_name",
]

BACKENDS = ("v2", "v1", "none")
DEFAULT_TIMEOUT = 5.0

# A single path component that is safe in every hierarchy and in log lines: no "/", no
# "..", no leading dot or dash, no whitespace, short enough for any filesystem.
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")

# CFS bandwidth: the kernel rejects quotas under 1 ms; 100 ms is its default period.
MIN_QUOTA_US = 1000
CPU_PERIOD_US = 100_000
MIN_CPU_MAX = MIN_QUOTA_US / CPU_PERIOD_US


class CgroupError(Exception):
    """A cgroup operation failed or a backend cannot be used; the message says what to do."""


def is_valid_name(name: str) -> bool:
    """Whether ``name`` is a safe cgroup directory name (see :func:`validate_name`)."""
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def validate_name(name: str, what: str = "tenant name") -> str:
    """Return ``name`` if it is a safe cgroup directory name, else raise CgroupError."""
    if not is_valid_name(name):
        raise CgroupError(
            f"invalid {what} {name!r}: use 1-63 characters from a-z, 0-9, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class TenantLimits:
    """What one tenant may use. ``None`` means unlimited (or the kernel default).

    - ``memory_max``: bytes, hard limit; going over it gets a process of the group OOM-killed.
      Swap counts against it too (v1 ``memory.memsw.limit_in_bytes``, v2 ``memory.swap.max 0``),
      so a tenant cannot dodge the limit by being swapped out.
    - ``memory_high``: bytes, where the kernel starts reclaiming and throttling the group.
      v2 ``memory.high``; v1 has only ``memory.soft_limit_in_bytes``, which is weaker: it is
      enforced only when the whole host is under memory pressure.
    - ``cpu_max``: cores, e.g. 0.5 is 50 ms of CPU per 100 ms period (at least 0.01).
    - ``cpu_weight``: 1..10000, relative share when CPUs are contended (default 100).
      v1 ``cpu.shares`` = weight * 1024 / 100.
    - ``pids_max``: processes and threads in the group; fork() fails with EAGAIN beyond it.
    """

    memory_max: int | None = None
    memory_high: int | None = None
    cpu_max: float | None = None
    cpu_weight: int | None = None
    pids_max: int | None = None

    def __post_init__(self) -> None:
        for name in ("memory_max", "memory_high", "pids_max"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise CgroupError(f"{name} must be a positive integer or None, not {value!r}")
        if self.cpu_max is not None and (
            isinstance(self.cpu_max, bool)
            or not isinstance(self.cpu_max, int | float)
            or not self.cpu_max >= MIN_CPU_MAX
            or self.cpu_max == float("inf")
        ):
            raise CgroupError(
                f"cpu_max must be a number of cores >= {MIN_CPU_MAX} (the kernel's 1 ms per "
                f"100 ms period) or None, not {self.cpu_max!r}"
            )
        if self.cpu_weight is not None and (
            isinstance(self.cpu_weight, bool)
            or not isinstance(self.cpu_weight, int)
            or not 1 <= self.cpu_weight <= 10000
        ):
            raise CgroupError(f"cpu_weight must be an integer in 1..10000, not {self.cpu_weight!r}")

    @classmethod
    def parse(
        cls,
        *,
        memory_max: str | int | None = None,
        memory_high: str | int | None = None,
        cpu_max: str | float | None = None,
        cpu_weight: int | None = None,
        pids_max: int | None = None,
    ) -> TenantLimits:
        """Limits from config-style values (``memory_max="128M"``, ``cpu_max="0.5"``).

        Raises ValueError (from :mod:`hourai.units`) or CgroupError with the offending value.
        """
        return cls(
            memory_max=None if memory_max is None else parse_size(memory_max),
            memory_high=None if memory_high is None else parse_size(memory_high),
            cpu_max=None if cpu_max is None else parse_cpus(cpu_max),
            cpu_weight=cpu_weight,
            pids_max=pids_max,
        )

    def overlay(self, other: TenantLimits | None) -> TenantLimits:
        """These limits with every field that ``other`` sets taken from it."""
        if other is None:
            return self
        given = {f: v for f in _LIMIT_FIELDS if (v := getattr(other, f)) is not None}
        return dataclasses.replace(self, **given)

    def cpu_quota_us(self, period_us: int) -> int | None:
        """CFS quota for ``period_us``, or None for no quota."""
        if self.cpu_max is None:
            return None
        return max(MIN_QUOTA_US, round(self.cpu_max * period_us))

    def describe(self) -> str:
        """``"memory 128 MiB, cpu 0.5, pids 64"`` for logs and error messages."""
        parts = []
        if self.memory_max is not None:
            parts.append(f"memory {format_size(self.memory_max)}")
        if self.memory_high is not None:
            parts.append(f"memory.high {format_size(self.memory_high)}")
        if self.cpu_max is not None:
            parts.append(f"cpu {self.cpu_max:g}")
        if self.cpu_weight is not None:
            parts.append(f"cpu weight {self.cpu_weight}")
        if self.pids_max is not None:
            parts.append(f"pids {self.pids_max}")
        return ", ".join(parts) or "unlimited"


_LIMIT_FIELDS = ("memory_max", "memory_high", "cpu_max", "cpu_weight", "pids_max")
# What a tenant gets when neither the operator nor its functions say otherwise: a tenant
# must not be able to take the whole host by default (the operator's [tenant_defaults]
# replaces these).
DEFAULT_TENANT_LIMITS = TenantLimits(memory_max=2 << 30, pids_max=1024)


def merge_declared(declared: list[TenantLimits]) -> TenantLimits:
    """What a tenant's functions declare together: per field the largest value any of them
    asks for. Order-independent (a restart restores functions in any order) and a function
    that declares one limit never drops another's."""
    merged: dict[str, int | float] = {}
    for limits in declared:
        for name in _LIMIT_FIELDS:
            value = getattr(limits, name)
            if value is not None:
                merged[name] = max(merged.get(name, value), value)
    return TenantLimits(**merged)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Usage:
    """A tenant group's consumption, read from the kernel (``none``: estimated).

    ``memory_peak`` is the kernel's high-water mark where it keeps one, else the highest value
    this process has read. ``oom_kills`` counts processes the kernel OOM-killed in the group.
    """

    memory_current: int
    memory_peak: int
    cpu_usec: int
    pids: int
    oom_kills: int


@runtime_checkable
class CgroupBackend(Protocol):
    """What the daemon, the zygotes and the stats need from a cgroup backend."""

    name: str
    """``"v2"``, ``"v1"`` or ``"none"``."""
    warning: str | None
    """Set only when tenants are not contained; print it at start and show it in stats."""

    def describe(self) -> str:
        """One line for the log: the backend, where its groups live, and why it was chosen."""
        ...

    def create(self, tenant: str, limits: TenantLimits) -> None:
        """Create the tenant's group (idempotent) and apply ``limits``."""
        ...

    def set_limits(self, tenant: str, limits: TenantLimits) -> None:
        """Apply ``limits`` to an existing group; a field left None resets to unlimited."""
        ...

    def place(self, tenant: str, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the tenant's group in every hierarchy."""
        ...

    def join(self, tenant: str) -> None:
        """Move the calling process into the tenant's group (in a child, before tenant code)."""
        ...

    def procs_files(self, tenant: str) -> list[str]:
        """The ``cgroup.procs`` files a process writes its pid to in order to join the group.

        For a child that cannot carry the backend object (a freshly spawned zygote); empty for
        ``none``.
        """
        ...

    def usage(self, tenant: str) -> Usage:
        """Current consumption of the group."""
        ...

    def pids(self, tenant: str) -> list[int]:
        """Live processes in the group, sorted ([] if the group does not exist)."""
        ...

    def oom_kill_count(self, tenant: str) -> int:
        """How many processes the kernel has OOM-killed in the group so far (a mark)."""
        ...

    def oom_killed_since(self, tenant: str, mark: int) -> bool:
        """True if an OOM kill happened in the group after ``mark`` was taken."""
        ...

    def kill_all(self, tenant: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """SIGKILL everything in the group and wait until no live process is left in it.

        Blocks for up to ``timeout`` seconds (CgroupError then); usually a few ms. Killed
        processes may linger as zombies, still counted in ``usage().pids``, until their
        parent reaps them. Refuses to kill the calling process.
        """
        ...

    def remove(self, tenant: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Kill what is left in the group and remove it (idempotent)."""
        ...

    def tenants(self) -> list[str]:
        """Tenant groups that exist under our subtree, sorted."""
        ...

    def cleanup_stale(self) -> list[str]:
        """Remove every tenant group (call at start, before creating any); returns their names."""
        ...

    def remove_subtree(self) -> None:
        """Remove every tenant group and the subtree directory itself (shutdown, tests)."""
        ...

    def applied(self, tenant: str) -> TenantLimits:
        """The tenant's limits as the kernel has them now (read back, not remembered)."""
        ...

    def subtree_dirs(self) -> list[str]:
        """The directories of our subtree (one per hierarchy; none without cgroups): what
        :func:`hourai.cgroup.owner.claim_subtree` locks."""
        ...

    def exists(self, tenant: str) -> bool:
        """Whether the tenant's group is there in every hierarchy."""
        ...


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class Mount:
    """One cgroup mount from /proc/self/mountinfo."""

    mountpoint: str  # absolute, already prefixed with detect()'s root
    root: str  # the cgroup of the hierarchy shown at the mountpoint (usually "/")
    fstype: str  # "cgroup" or "cgroup2"
    options: frozenset[str] = field(default_factory=frozenset)  # super options: controllers, name=


def _unescape(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def read_mounts(root: str = "/") -> list[Mount]:
    """The cgroup and cgroup2 mounts visible to this process."""
    mounts = []
    with open(os.path.join(root, "proc/self/mountinfo")) as f:
        for line in f:
            left, sep, right = line.partition(" - ")
            if not sep:
                continue
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
                continue
            mountpoint = os.path.join(root, _unescape(fields[4]).lstrip("/"))
            mounts.append(
                Mount(
                    mountpoint=mountpoint.rstrip("/") or "/",
                    root=_unescape(fields[3]),
                    fstype=tail[0],
                    options=frozenset(tail[2].split(",")),
                )
            )
    return mounts


def read_self_cgroups(root: str = "/") -> dict[str, str]:
    """This process's cgroup per v1 controller, and per ``""`` for the unified hierarchy.

    ``"4:memory:/a/b"`` gives ``{"memory": "/a/b"}``; ``"1:cpu,cpuacct:/"`` gives both
    ``cpu`` and ``cpuacct``; ``"0::/x"`` gives ``{"": "/x"}``.
    """
    result: dict[str, str] = {}
    with open(os.path.join(root, "proc/self/cgroup")) as f:
        for line in f:
            parts = line.rstrip("\n").split(":", 2)
            if len(parts) != 3:
                continue
            _hid, controllers, path = parts
            for controller in controllers.split(",") if controllers else [""]:
                result[controller] = path
    return result


def cgroup_dir(mount: Mount, path: str) -> str | None:
    """Directory of cgroup ``path`` under ``mount``, or None if that mount does not show it."""
    if mount.root in ("/", ""):
        rel = path
    elif path == mount.root or path.startswith(mount.root.rstrip("/") + "/"):
        rel = path[len(mount.root) :]
    else:
        return None
    return os.path.join(mount.mountpoint, rel.lstrip("/")).rstrip("/")


# --------------------------------------------------------------------------- shared helpers


def read_pid_list(path: str) -> list[int]:
    """Pids in a ``cgroup.procs``-style file; [] if the group is gone."""
    try:
        with open(path) as f:
            return [int(line) for line in f.read().split()]
    except FileNotFoundError:
        return []


def kill_until_empty(
    list_pids: Callable[[], list[int]],
    timeout: float,
    what: str,
    kill: Callable[[list[int]], None] | None = None,
) -> None:
    """SIGKILL whatever ``list_pids()`` reports until it reports nothing.

    Repeats the kill on every round because a process may fork between our read and our
    signal; ``pids.max`` bounds how long that can go on. ``kill`` replaces the per-pid
    signals (v2's ``cgroup.kill``). cgroupfs has no portable "became empty" notification
    (v1 only has release_agent), so this polls with backoff up to ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        pids = list_pids()
        if not pids:
            return
        if os.getpid() in pids:
            raise CgroupError(f"{what}: refusing to kill the calling process {os.getpid()}")
        if kill is not None:
            kill(pids)
        else:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if time.monotonic() >= deadline:
            raise CgroupError(
                f"{what}: still not empty {timeout:g}s after SIGKILL, pids {pids[:20]}; a "
                "process stuck in uninterruptible sleep (D state) can take longer, check "
                "/proc/<pid>/stack"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def rmdir_retry(
    path: str, timeout: float, what: str, rmdir: Callable[[str], None] = os.rmdir
) -> None:
    """rmdir a cgroup directory, retrying while the kernel still reports it busy.

    Right after the last process of a group dies, the group can stay populated until the
    exiting task passes cgroup_exit(); rmdir fails with EBUSY in that window.
    """
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        try:
            rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise CgroupError(f"{what}: cannot remove {path}: {exc.strerror}") from exc
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


# --------------------------------------------------------------------------- detection


def detect(prefer: str = "auto", *, subtree: str = "hourai", root: str = "/") -> CgroupBackend:
    """The best backend this host allows, or the one asked for.

    ``prefer``: ``"auto"`` tries v2 (a unified hierarchy whose own cgroup offers memory, cpu
    and pids and is writable), then v1 (root, with the memory, cpu and pids hierarchies
    mounted and writable), then falls back to ``none`` with a warning saying why. Forcing
    ``"v2"`` or ``"v1"`` on a host that cannot do it raises CgroupError with what to do.
    ``subtree`` names the directory under the daemon's own cgroup that holds tenant groups.
    ``root`` is the filesystem root for /proc and the mounts (tests point it at a fake tree).
    Detection only reads; nothing is created until the first ``create()``.
    """
    from hourai.cgroup import none, v1, v2

    if prefer not in ("auto", *BACKENDS):
        raise CgroupError(f"unknown cgroup backend {prefer!r}: use auto, v2, v1 or none")
    validate_name(subtree, "cgroup subtree name")
    if prefer == "none":
        return none.NoneBackend(
            warning=none.warning_text("the cgroup backend was set to 'none'"),
            reason="asked for",
        )
    try:
        mounts = read_mounts(root)
        own = read_self_cgroups(root)
    except OSError as exc:
        mounts, own = [], {}
        proc_problem = f"cannot read /proc/self ({exc})"
    else:
        proc_problem = ""

    reasons = []
    if prefer in ("auto", "v2"):
        backend_v2, why_not = v2.probe(mounts, own, subtree) if not proc_problem else (None, "")
        if backend_v2 is not None:
            return backend_v2
        why_not = why_not or proc_problem
        if prefer == "v2":
            raise CgroupError(f"cgroup v2 is not usable: {why_not}. {v2.HOW_TO_FIX}")
        reasons.append(f"v2 not usable: {why_not}")
    if prefer in ("auto", "v1"):
        backend_v1, why_not = v1.probe(mounts, own, subtree) if not proc_problem else (None, "")
        if backend_v1 is not None:
            backend_v1.reason = "; ".join([backend_v1.reason, *reasons])
            return backend_v1
        why_not = why_not or proc_problem
        if prefer == "v1":
            raise CgroupError(f"cgroup v1 is not usable: {why_not}. {v1.HOW_TO_FIX}")
        reasons.append(f"v1 not usable: {why_not}")
    why = "; ".join(reasons)
    return none.NoneBackend(warning=none.warning_text(why), reason=why)
