"""cgroup v1 (one hierarchy per controller), through cgroupspy.

Each of the memory, cpu, cpuacct and pids hierarchies gets the same layout below the cgroup
this process was started in *in that hierarchy* (they may differ: a container runtime may
have put us in ``/process_api/ab12`` for memory and ``/`` for cpu)::

    <own in memory>/<subtree>/<tenant>/     memory.limit_in_bytes, memsw, soft limit
    <own in cpu>/<subtree>/<tenant>/        cpu.cfs_quota_us, cpu.cfs_period_us, cpu.shares
    <own in cpuacct>/<subtree>/<tenant>/    cpuacct.usage (may be the cpu directory when
                                            co-mounted as "cpu,cpuacct")
    <own in pids>/<subtree>/<tenant>/       pids.max

Mount points come from /proc/self/mountinfo, never from a fixed list of paths. Unlike v2
there is no "no internal processes" rule, so the daemon stays where it is.

cgroupspy models a hierarchy as a tree of ``Node`` objects whose ``controller`` exposes typed
properties for the memory, cpu and cpuacct files; we use it for those and for creating
groups. It has no pids controller, knows nothing about the EBUSY window when removing a
group, and its writes go through a buffered text file; those spots use plain file I/O.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from cgroupspy.controllers import CpuAcctController, CpuController, MemoryController
from cgroupspy.nodes import Node

from hourai.cgroup import (
    CPU_PERIOD_US,
    DEFAULT_TIMEOUT,
    CgroupError,
    Mount,
    TenantLimits,
    Usage,
    cgroup_dir,
    is_valid_name,
    kill_until_empty,
    read_pid_list,
    rmdir_retry,
    validate_name,
)

REQUIRED_CONTROLLERS = ("memory", "cpu", "pids")
OPTIONAL_CONTROLLERS = ("cpuacct",)
HOW_TO_FIX = (
    "Run hourai as root with the memory, cpu and pids cgroup v1 hierarchies mounted "
    "read-write (usually under /sys/fs/cgroup), or choose the none backend"
)
# What v1 limit files take for "no limit"; reading back shows a large page-aligned number.
_UNLIMITED = -1


@dataclass(frozen=True)
class Hierarchy:
    """Where one controller's hierarchy is mounted and where this process sits in it."""

    controller: str
    mount: str  # e.g. /sys/fs/cgroup/memory
    own: str  # our cgroup relative to the mount, e.g. /process_api/ab12

    @property
    def own_dir(self) -> str:
        return os.path.join(self.mount, self.own.lstrip("/")).rstrip("/")


def _controller_root(mount: str, controller: str) -> Node:
    top = Node(os.fsencode(os.path.dirname(mount)))
    node = Node(os.fsencode(os.path.basename(mount)), parent=top)
    wanted = controller.encode()
    if node.controller_type != wanted:
        # cgroupspy picks the controller class from the mount directory's name, so a
        # hierarchy mounted under another name (or co-mounted as "cpu,cpuacct") needs it
        # set by hand; children inherit it from here.
        node.controller_type = wanted if wanted in Node.CONTROLLERS else None
        node.controller = node._get_controller()
    return node


def _write(path: str | bytes, value: str | int) -> None:
    # One write(2) per value with the errno raised at the write, not at close().
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


class V1Backend:
    """Tenant groups in the v1 hierarchies given by ``hierarchies`` (controller -> Hierarchy).

    memory, cpu and pids are required; without cpuacct, ``usage().cpu_usec`` reads 0.
    """

    name = "v1"
    warning: str | None = None

    def __init__(
        self, hierarchies: Mapping[str, Hierarchy], subtree: str = "hourai", *, reason: str = ""
    ) -> None:
        validate_name(subtree, "cgroup subtree name")
        missing = [c for c in REQUIRED_CONTROLLERS if c not in hierarchies]
        if missing:
            raise CgroupError(f"cgroup v1: no {', '.join(missing)} hierarchy given. {HOW_TO_FIX}")
        self.hierarchies = dict(hierarchies)
        self.subtree = subtree
        self.reason = reason
        self._ready = False

    # ---------------------------------------------------------------- plumbing

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise CgroupError(f"cgroup v1: {action}: {exc.strerror or exc}") from exc

    def _node(self, controller: str, tenant: str | None = None) -> Node:
        """A fresh cgroupspy node for our subtree (or a tenant group in it).

        Fresh on every call: cgroupspy caches children on the parent node and refuses to
        create a child it already lists, which would break idempotent create() after a
        remove() done by another process.
        """
        h = self.hierarchies[controller]
        node = _controller_root(h.mount, controller)
        for part in [*h.own.strip("/").split("/"), self.subtree, tenant]:
            if part:
                node = Node(part, parent=node)
        return node

    def _base_dirs(self) -> list[str]:
        """Our subtree in each hierarchy, once per directory (cpu,cpuacct may share one)."""
        dirs = [os.path.join(h.own_dir, self.subtree) for h in self.hierarchies.values()]
        return list(dict.fromkeys(dirs))

    def _dirs(self, tenant: str) -> list[str]:
        validate_name(tenant)
        return [os.path.join(base, tenant) for base in self._base_dirs()]

    def _require(self, tenant: str) -> None:
        for path in self._dirs(tenant):
            if not os.path.isdir(path):
                raise CgroupError(f"tenant {tenant!r} has no cgroup ({path}); create() it first")

    def _memory(self, tenant: str) -> MemoryController:
        return self._node("memory", tenant).controller

    def _ensure_ready(self) -> None:
        if self._ready and all(os.path.isdir(d) for d in self._base_dirs()):
            return
        for controller, h in self.hierarchies.items():
            own = _controller_root(h.mount, controller)
            for part in h.own.strip("/").split("/"):
                if part:
                    own = Node(part, parent=own)
            with self._errors(f"creating {self.subtree} in {h.own_dir}"):
                if not os.path.isdir(os.path.join(h.own_dir, self.subtree)):
                    own.create_cgroup(self.subtree)
        memory = self._node("memory").controller
        with self._errors("enabling memory.use_hierarchy"):
            if not memory.use_hierarchy:
                # Old kernels default to flat accounting, where a tenant's pages would not
                # count against the daemon's own memory limit. Settable only while the
                # group has no children, i.e. right here.
                memory.use_hierarchy = True
        self._ready = True

    # ---------------------------------------------------------------- interface

    def describe(self) -> str:
        where = ", ".join(
            f"{c} {os.path.join(h.own_dir, self.subtree)}" for c, h in self.hierarchies.items()
        )
        text = f"cgroup v1: tenant groups in {where}"
        if "cpuacct" not in self.hierarchies:
            text += " (no cpuacct hierarchy: CPU usage reads 0)"
        return f"{text}; {self.reason}" if self.reason else text

    def create(self, tenant: str, limits: TenantLimits) -> None:
        validate_name(tenant)
        self._ensure_ready()
        for controller in self.hierarchies:
            parent = self._node(controller)
            with self._errors(f"creating tenant {tenant!r} in {os.fsdecode(parent.full_path)}"):
                if not os.path.isdir(os.path.join(parent.full_path, tenant.encode())):
                    parent.create_cgroup(tenant)
        self.set_limits(tenant, limits)

    def set_limits(self, tenant: str, limits: TenantLimits) -> None:
        self._require(tenant)
        memory = self._memory(tenant)
        with self._errors(f"setting memory limit {limits.memory_max} for {tenant!r}"):
            self._set_memory_max(memory, limits.memory_max)
        with self._errors(f"setting memory soft limit {limits.memory_high} for {tenant!r}"):
            # cgroupspy writes None as -1, which v1 reads as "unlimited"
            memory.soft_limit_in_bytes = limits.memory_high
        cpu: CpuController = self._node("cpu", tenant).controller
        with self._errors(f"setting cpu limits for {tenant!r}"):
            cpu.cfs_period_us = CPU_PERIOD_US
            cpu.cfs_quota_us = limits.cpu_quota_us(CPU_PERIOD_US)
            weight = 100 if limits.cpu_weight is None else limits.cpu_weight
            cpu.shares = max(2, weight * 1024 // 100)  # the kernel's minimum is 2
        pids_max = self._node("pids", tenant).full_path + b"/pids.max"
        with self._errors(f"writing {os.fsdecode(pids_max)}"):
            _write(pids_max, "max" if limits.pids_max is None else limits.pids_max)

    def _set_memory_max(self, memory: MemoryController, limit: int | None) -> None:
        if not os.path.exists(memory.filepath(b"memory.memsw.limit_in_bytes")):
            memory.limit_in_bytes = limit  # swap accounting off: there is no memsw to tie
            return
        # memsw (memory+swap) equals the memory limit, so swapping out cannot get a tenant
        # past it. The kernel keeps memsw >= memory at every step and rejects a write that
        # would break that, so growing writes memsw first and shrinking writes it last.
        target = sys.maxsize if limit is None else limit
        current_memsw = memory.memsw_limit_in_bytes or sys.maxsize
        if target >= current_memsw:
            memory.memsw_limit_in_bytes = limit
            memory.limit_in_bytes = limit
        else:
            memory.limit_in_bytes = limit
            memory.memsw_limit_in_bytes = limit

    def place(self, tenant: str, pid: int) -> None:
        self._require(tenant)
        # cgroup.procs is the same in every hierarchy, pids included, so one plain write
        # serves all; and it raises ESRCH at the write rather than at close().
        for path in self._dirs(tenant):
            try:
                _write(os.path.join(path, "cgroup.procs"), pid)
            except ProcessLookupError as exc:
                raise CgroupError(
                    f"cannot place pid {pid} in tenant {tenant!r}: no such process"
                ) from exc
            except OSError as exc:
                raise CgroupError(
                    f"cgroup v1: writing pid {pid} to {path}/cgroup.procs: {exc.strerror}"
                ) from exc

    def join(self, tenant: str) -> None:
        self.place(tenant, os.getpid())

    def procs_files(self, tenant: str) -> list[str]:
        self._require(tenant)
        return [os.path.join(path, "cgroup.procs") for path in self._dirs(tenant)]

    def pids(self, tenant: str) -> list[int]:
        # The union: a crash between two hierarchies' writes can leave a process in some only.
        found: set[int] = set()
        for path in self._dirs(tenant):
            found.update(read_pid_list(os.path.join(path, "cgroup.procs")))
        return sorted(found)

    def usage(self, tenant: str) -> Usage:
        self._require(tenant)
        memory = self._memory(tenant)
        with self._errors(f"reading memory usage of {tenant!r}"):
            current = memory.usage_in_bytes
            peak = memory.max_usage_in_bytes
        cpu_usec = 0
        if "cpuacct" in self.hierarchies:
            acct: CpuAcctController = self._node("cpuacct", tenant).controller
            with self._errors(f"reading cpuacct.usage of {tenant!r}"):
                cpu_usec = acct.usage // 1000  # nanoseconds
        pids_current = self._node("pids", tenant).full_path + b"/pids.current"
        with self._errors(f"reading {os.fsdecode(pids_current)}"), open(pids_current) as f:
            pids = int(f.read())
        return Usage(
            memory_current=current,
            memory_peak=peak,
            cpu_usec=cpu_usec,
            pids=pids,
            oom_kills=self.oom_kill_count(tenant),
        )

    def oom_kill_count(self, tenant: str) -> int:
        # The "oom_kill" line of memory.oom_control (Linux 4.13+) counts kills of processes
        # in this group. Older kernels lack it; then OOM kills cannot be told apart from
        # other SIGKILLs and this stays 0.
        # Read on every fork (the mark a worker's death is compared with): the file itself,
        # not through a fresh cgroupspy node and a check of every hierarchy's directory,
        # which took about 4x as long (0.13 ms) on the request path.
        group = os.path.join(
            self.hierarchies["memory"].own_dir, self.subtree, validate_name(tenant)
        )
        try:
            with open(os.path.join(group, "memory.oom_control")) as f:
                control = f.read()
        except FileNotFoundError:
            raise CgroupError(
                f"tenant {tenant!r} has no cgroup ({group}); create() it first"
            ) from None
        except OSError as exc:
            raise CgroupError(
                f"cgroup v1: reading memory.oom_control of {tenant!r}: {exc.strerror or exc}"
            ) from exc
        for line in control.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def oom_killed_since(self, tenant: str, mark: int) -> bool:
        return self.oom_kill_count(tenant) > mark

    def kill_all(self, tenant: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        # v1 has no cgroup.kill; kill_until_empty repeats SIGKILL until no process is left,
        # which converges because pids.max bounds how fast a group can refill itself.
        kill_until_empty(lambda: self.pids(tenant), timeout, f"tenant {tenant!r}")

    def remove(self, tenant: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.kill_all(tenant, timeout)
        for path in self._dirs(tenant):
            self._remove_dir(path, timeout, f"tenant {tenant!r}")

    def _remove_dir(self, path: str, timeout: float, what: str) -> None:
        """Remove a group and any child groups in it, killing what runs there."""
        try:
            children = [e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return
        for child in children:
            self._remove_dir(child, timeout, what)
        procs = os.path.join(path, "cgroup.procs")
        kill_until_empty(lambda: read_pid_list(procs), timeout, what)
        # cgroupspy's delete_cgroup is a bare rmdir; the EBUSY window needs the retry.
        rmdir_retry(path, timeout, f"cgroup v1: {what}")

    def tenants(self) -> list[str]:
        names: set[str] = set()
        for base in self._base_dirs():
            with contextlib.suppress(FileNotFoundError):
                names.update(
                    e.name
                    for e in os.scandir(base)
                    if e.is_dir(follow_symlinks=False) and is_valid_name(e.name)
                )
        return sorted(names)

    def cleanup_stale(self) -> list[str]:
        names = self.tenants()
        for name in names:
            self.remove(name)
        return names

    def applied(self, tenant: str) -> TenantLimits:
        self._require(tenant)

        def read(controller: str, name: str) -> str:
            path = os.path.join(self._node(controller, tenant).full_path.decode(), name)
            with self._errors(f"reading {path}"), open(path) as f:
                return f.read().strip()

        def limit(text: str) -> int | None:
            value = int(text)  # "unlimited" reads back as a page-aligned LONG_MAX
            return None if value >= (sys.maxsize // 4096) * 4096 or value < 0 else value

        quota = int(read("cpu", "cpu.cfs_quota_us"))
        period = int(read("cpu", "cpu.cfs_period_us"))
        shares = int(read("cpu", "cpu.shares"))
        pids = read("pids", "pids.max")
        return TenantLimits(
            memory_max=limit(read("memory", "memory.limit_in_bytes")),
            memory_high=limit(read("memory", "memory.soft_limit_in_bytes")),
            cpu_max=None if quota < 0 else round(quota / period, 4),
            cpu_weight=None if shares == 1024 else max(1, min(10000, shares * 100 // 1024)),
            pids_max=None if pids == "max" else int(pids),
        )

    def subtree_dirs(self) -> list[str]:
        return self._base_dirs()

    def exists(self, tenant: str) -> bool:
        return all(os.path.isdir(path) for path in self._dirs(tenant))

    def remove_subtree(self) -> None:
        self.cleanup_stale()
        for base in self._base_dirs():
            self._remove_dir(base, DEFAULT_TIMEOUT, "subtree")
        self._ready = False


# --------------------------------------------------------------------------- detection


def probe(mounts: list[Mount], own: dict[str, str], subtree: str) -> tuple[V1Backend | None, str]:
    """A v1 backend if this host can run one, else None and the reason."""
    if os.geteuid() != 0:
        return None, f"not running as root (uid {os.geteuid()}); v1 cannot be safely delegated"
    hierarchies: dict[str, Hierarchy] = {}
    problems = []
    for controller in (*REQUIRED_CONTROLLERS, *OPTIONAL_CONTROLLERS):
        found, problem = _find(controller, mounts, own)
        if found is not None:
            hierarchies[controller] = found
        elif controller in REQUIRED_CONTROLLERS:
            problems.append(problem)
    if problems:
        return None, "; ".join(problems)
    return V1Backend(hierarchies, subtree, reason="memory, cpu and pids hierarchies writable"), ""


def _find(
    controller: str, mounts: list[Mount], own: dict[str, str]
) -> tuple[Hierarchy | None, str]:
    candidates = [m for m in mounts if m.fstype == "cgroup" and controller in m.options]
    if not candidates:
        return None, f"no {controller} hierarchy is mounted"
    path = own.get(controller)
    if path is None:
        return None, f"/proc/self/cgroup has no {controller} line"
    for mount in candidates:
        directory = cgroup_dir(mount, path)
        if directory is None or not os.path.isdir(directory):
            continue
        if not os.access(directory, os.W_OK):
            return None, f"{directory} is not writable (read-only cgroup mount?)"
        rel = "/" + os.path.relpath(directory, mount.mountpoint)
        return Hierarchy(controller, mount.mountpoint, "/" if rel == "/." else rel), ""
    where = ", ".join(m.mountpoint for m in candidates)
    return None, f"our {controller} cgroup {path} is not visible under {where}"
