"""No cgroups: tenants are not contained. Used when neither v2 nor v1 is usable.

Nothing is created in the kernel. The backend only remembers which processes were
``place()``d for which tenant and estimates usage from them (and their descendants) with
psutil, which is best effort:

- processes that already exited are not counted (their CPU time is lost);
- ``memory_current`` sums RSS, so pages shared between a snapshot and its workers are
  counted once per process; ``memory_peak`` is the highest sum this object has computed;
- ``join()`` records the calling process in *its own* copy of the backend, which the
  daemon never sees; the daemon should ``place()`` workers by pid instead;
- ``oom_kills`` is always 0: with no memory limit there is no OOM kill to report, only
  rlimits (RLIMIT_AS turns overuse into MemoryError inside the worker).

What still protects the host here are the rlimits and uids that :mod:`hourai.isolate` applies.
"""

from __future__ import annotations

import contextlib
import os

import psutil

from hourai.cgroup import DEFAULT_TIMEOUT, TenantLimits, Usage, kill_until_empty, validate_name


def warning_text(why: str) -> str:
    """The warning shown at start and in stats when tenants are not contained."""
    return (
        "WARNING: tenants are NOT contained: no cgroup limits on memory, CPU or process "
        f"count, so one tenant can starve or OOM the whole host ({why}). To fix: run hourai "
        "as root on a host with cgroup v2 (or the v1 memory, cpu and pids hierarchies), or "
        "as a systemd service with Delegate=yes."
    )


class NoneBackend:
    """The cgroup interface without cgroups; see the module docstring for what it cannot do."""

    name = "none"

    def __init__(self, warning: str | None = None, reason: str = "") -> None:
        self.warning: str | None = warning or warning_text("no cgroup backend configured")
        self.reason = reason
        self._limits: dict[str, TenantLimits] = {}
        self._placed: dict[str, set[int]] = {}
        self._peaks: dict[str, int] = {}

    def describe(self) -> str:
        return f"no cgroups: tenants are not contained; {self.reason or 'asked for'}"

    def create(self, tenant: str, limits: TenantLimits) -> None:
        validate_name(tenant)
        self._limits[tenant] = limits
        self._placed.setdefault(tenant, set())

    def set_limits(self, tenant: str, limits: TenantLimits) -> None:
        validate_name(tenant)
        self._limits[tenant] = limits

    def place(self, tenant: str, pid: int) -> None:
        validate_name(tenant)
        self._placed.setdefault(tenant, set()).add(pid)

    def join(self, tenant: str) -> None:
        self.place(tenant, os.getpid())

    def procs_files(self, tenant: str) -> list[str]:
        validate_name(tenant)
        return []

    def _processes(self, tenant: str) -> list[psutil.Process]:
        """Live placed processes of ``tenant`` and their descendants (zombies excluded)."""
        found: dict[int, psutil.Process] = {}
        for pid in sorted(self._placed.get(tenant, ())):
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                for p in [proc, *proc.children(recursive=True)]:
                    found.setdefault(p.pid, p)
        alive = []
        for p in found.values():
            with contextlib.suppress(psutil.Error):
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        return alive

    def pids(self, tenant: str) -> list[int]:
        validate_name(tenant)
        return sorted(p.pid for p in self._processes(tenant))

    def usage(self, tenant: str) -> Usage:
        validate_name(tenant)
        rss = cpu = count = 0
        for p in self._processes(tenant):
            with contextlib.suppress(psutil.Error):
                with p.oneshot():
                    rss += p.memory_info().rss
                    times = p.cpu_times()
                    cpu += int((times.user + times.system) * 1_000_000)
                count += 1
        peak = max(self._peaks.get(tenant, 0), rss)
        self._peaks[tenant] = peak
        return Usage(memory_current=rss, memory_peak=peak, cpu_usec=cpu, pids=count, oom_kills=0)

    def oom_kill_count(self, tenant: str) -> int:
        validate_name(tenant)
        return 0

    def oom_killed_since(self, tenant: str, mark: int) -> bool:
        validate_name(tenant)
        return False

    def kill_all(self, tenant: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        validate_name(tenant)
        kill_until_empty(lambda: self.pids(tenant), timeout, f"tenant {tenant!r}")
        self._placed[tenant] = set()

    def remove(self, tenant: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Kill the processes placed for ``tenant`` and forget it (idempotent)."""
        if tenant in self._placed:
            self.kill_all(tenant, timeout)
        self._placed.pop(tenant, None)
        self._limits.pop(tenant, None)
        self._peaks.pop(tenant, None)

    def tenants(self) -> list[str]:
        return sorted(set(self._placed) | set(self._limits))

    def cleanup_stale(self) -> list[str]:
        # Nothing outlives a previous run that we could find: its workers died with it
        # (PR_SET_PDEATHSIG) and there are no groups to list.
        return []

    def applied(self, tenant: str) -> TenantLimits:
        return TenantLimits()  # nothing is enforced

    def subtree_dirs(self) -> list[str]:
        return []

    def exists(self, tenant: str) -> bool:
        return True  # nothing to vanish

    def remove_subtree(self) -> None:
        for tenant in self.tenants():
            self.remove(tenant)
