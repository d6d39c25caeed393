"""cgroup v2 (the unified hierarchy), through its files.

Layout, below the cgroup the daemon was started in (``<own>``, e.g. a systemd service with
``Delegate=yes``)::

    <own>/                      cgroup.subtree_control: +memory +cpu +pids
    <own>/daemon/               the daemon and anything else that was in <own>
    <own>/<subtree>/            cgroup.subtree_control: +memory +cpu +pids
    <own>/<subtree>/<tenant>/   memory.max, memory.high, cpu.max, cpu.weight, pids.max

The ``daemon`` leaf exists because of the "no internal processes" rule: the kernel refuses
to enable controllers in ``cgroup.subtree_control`` of a (non-root) cgroup that has member
processes, so whatever lives in ``<own>`` moves one level down first.

All file access goes through :class:`CgroupFS`, so tests can run this backend against a
temporary tree that emulates cgroupfs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

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
    rmdir_retry,
    validate_name,
)

REQUIRED_CONTROLLERS = ("memory", "cpu", "pids")
DAEMON_LEAF = "daemon"
HOW_TO_FIX = (
    "Run hourai as root on a host that uses the unified hierarchy, or as a systemd service "
    "with Delegate=yes (the memory, cpu and pids controllers must be enabled for its cgroup), "
    "or choose the v1 or none backend"
)


class CgroupFS:
    """The handful of filesystem operations the v2 backend uses, as the kernel sees them.

    Each write is one ``write(2)`` of the whole value: cgroupfs parses every write on its
    own, so a buffered writer that split a value would corrupt it.
    """

    def read(self, path: str) -> str:
        with open(path) as f:
            return f.read()

    def write(self, path: str, data: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def mkdir(self, path: str) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def listdir(self, path: str) -> list[str]:
        """Child cgroups (directories) of ``path``."""
        with os.scandir(path) as it:
            return [e.name for e in it if e.is_dir(follow_symlinks=False)]


def _flat_keyed(text: str) -> dict[str, int]:
    """Parse ``key value`` lines (cpu.stat, memory.events)."""
    result = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            result[key] = int(value)
    return result


def _max_or(value: int | None) -> str:
    return "max" if value is None else str(value)


class V2Backend:
    """Tenant groups in the unified hierarchy mounted at ``mount``.

    ``self_cgroup`` is the daemon's own cgroup relative to the mount (``"/"`` for the root).
    ``controllers`` are the controllers enabled for tenant groups; only tests that exercise
    the real kernel on a host whose memory, cpu and pids controllers are bound to v1 pass
    anything else. ``fs`` replaces file access (tests).
    """

    name = "v2"
    warning: str | None = None

    def __init__(
        self,
        mount: str,
        self_cgroup: str,
        subtree: str = "hourai",
        *,
        controllers: tuple[str, ...] = REQUIRED_CONTROLLERS,
        fs: CgroupFS | None = None,
        reason: str = "",
    ) -> None:
        validate_name(subtree, "cgroup subtree name")
        if subtree == DAEMON_LEAF:
            raise CgroupError(f"the subtree cannot be named {DAEMON_LEAF!r}: the daemon goes there")
        self.mount = mount.rstrip("/") or "/"
        self.self_cgroup = "/" + self_cgroup.strip("/")
        self.own_dir = os.path.join(self.mount, self.self_cgroup.lstrip("/")).rstrip("/")
        self.base = os.path.join(self.own_dir, subtree)
        self.leaf = os.path.join(self.own_dir, DAEMON_LEAF)
        self.controllers = tuple(controllers)
        self.fs = fs or CgroupFS()
        self.reason = reason
        self._ready = False
        # memory.peak only exists since Linux 5.19; before that, the highest value we read.
        self._peaks: dict[str, int] = {}

    # ---------------------------------------------------------------- plumbing

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise CgroupError(f"cgroup v2: {action}: {exc.strerror or exc}") from exc

    def _read(self, path: str) -> str:
        with self._errors(f"reading {path}"):
            return self.fs.read(path)

    def _write(self, path: str, data: str) -> None:
        with self._errors(f"writing {data!r} to {path}"):
            self.fs.write(path, data)

    def _procs(self, path: str) -> list[int]:
        try:
            return sorted(int(p) for p in self.fs.read(os.path.join(path, "cgroup.procs")).split())
        except FileNotFoundError:
            return []

    def _dir(self, tenant: str) -> str:
        return os.path.join(self.base, validate_name(tenant))

    def _existing(self, tenant: str) -> str:
        path = self._dir(tenant)
        if not self.fs.exists(path):
            raise CgroupError(f"tenant {tenant!r} has no cgroup ({path}); create() it first")
        return path

    def _ensure_ready(self) -> None:
        """Enable our controllers for ``<own>`` and ``<own>/<subtree>`` (idempotent)."""
        if self._ready and self.fs.exists(self.base):
            return
        wanted = set(self.controllers)
        control = os.path.join(self.own_dir, "cgroup.subtree_control")
        missing = wanted - set(self._read(control).split())
        if missing:
            if self.self_cgroup != "/":
                # The root cgroup is exempt from the no-internal-processes rule; any other
                # cgroup must be empty before controllers can be enabled, so every member
                # moves, not only the daemon. In a delegated subtree they are all ours.
                with self._errors(f"creating {self.leaf}"):
                    self.fs.mkdir(self.leaf)
                for pid in self._procs(self.own_dir):
                    try:
                        self.fs.write(os.path.join(self.leaf, "cgroup.procs"), str(pid))
                    except ProcessLookupError:
                        pass  # exited meanwhile
                    except OSError as exc:
                        raise CgroupError(
                            f"cgroup v2: cannot move pid {pid} from {self.own_dir} into "
                            f"{self.leaf}: {exc.strerror}"
                        ) from exc
            self._write(control, " ".join(f"+{c}" for c in sorted(missing)))
        with self._errors(f"creating {self.base}"):
            self.fs.mkdir(self.base)
        control = os.path.join(self.base, "cgroup.subtree_control")
        missing = wanted - set(self._read(control).split())
        if missing:
            self._write(control, " ".join(f"+{c}" for c in sorted(missing)))
        self._ready = True

    # ---------------------------------------------------------------- interface

    def describe(self) -> str:
        text = (
            f"cgroup v2: tenant groups in {self.base} "
            f"(controllers: {' '.join(self.controllers) or 'none'})"
        )
        return f"{text}; {self.reason}" if self.reason else text

    def create(self, tenant: str, limits: TenantLimits) -> None:
        self._ensure_ready()
        path = self._dir(tenant)
        with self._errors(f"creating {path}"):
            self.fs.mkdir(path)
        self.set_limits(tenant, limits)

    def set_limits(self, tenant: str, limits: TenantLimits) -> None:
        path = self._existing(tenant)
        writes: list[tuple[str, str]] = []
        if "memory" in self.controllers:
            writes += [
                ("memory.max", _max_or(limits.memory_max)),
                ("memory.high", _max_or(limits.memory_high)),
            ]
            if self.fs.exists(os.path.join(path, "memory.swap.max")):
                # Like v1's memsw limit: swap must not let a tenant grow past memory_max.
                writes.append(("memory.swap.max", "max" if limits.memory_max is None else "0"))
        if "cpu" in self.controllers:
            quota = limits.cpu_quota_us(CPU_PERIOD_US)
            writes += [
                ("cpu.max", f"{_max_or(quota)} {CPU_PERIOD_US}"),
                ("cpu.weight", str(100 if limits.cpu_weight is None else limits.cpu_weight)),
            ]
        if "pids" in self.controllers:
            writes.append(("pids.max", _max_or(limits.pids_max)))
        self._check_supported(limits)
        for name, value in writes:
            self._write(os.path.join(path, name), value)

    def _check_supported(self, limits: TenantLimits) -> None:
        needs = {
            "memory": limits.memory_max is not None or limits.memory_high is not None,
            "cpu": limits.cpu_max is not None or limits.cpu_weight is not None,
            "pids": limits.pids_max is not None,
        }
        for controller, needed in needs.items():
            if needed and controller not in self.controllers:
                raise CgroupError(
                    f"cgroup v2: cannot apply {limits.describe()}: the {controller} controller "
                    f"is not enabled for {self.base}"
                )

    def place(self, tenant: str, pid: int) -> None:
        path = os.path.join(self._existing(tenant), "cgroup.procs")
        try:
            self.fs.write(path, str(pid))
        except ProcessLookupError as exc:
            raise CgroupError(
                f"cannot place pid {pid} in tenant {tenant!r}: no such process"
            ) from exc
        except OSError as exc:
            raise CgroupError(f"cgroup v2: writing pid {pid} to {path}: {exc.strerror}") from exc

    def join(self, tenant: str) -> None:
        self.place(tenant, os.getpid())

    def procs_files(self, tenant: str) -> list[str]:
        return [os.path.join(self._existing(tenant), "cgroup.procs")]

    def pids(self, tenant: str) -> list[int]:
        return self._procs(self._dir(tenant))

    def usage(self, tenant: str) -> Usage:
        path = self._existing(tenant)
        cpu = _flat_keyed(self._read(os.path.join(path, "cpu.stat")))  # core file, always there
        memory_current = peak = oom_kills = 0
        if "memory" in self.controllers:
            memory_current = int(self._read(os.path.join(path, "memory.current")))
            peak_file = os.path.join(path, "memory.peak")
            if self.fs.exists(peak_file):
                peak = int(self._read(peak_file))
            else:
                peak = max(self._peaks.get(tenant, 0), memory_current)
                self._peaks[tenant] = peak
            oom_kills = self.oom_kill_count(tenant)
        if "pids" in self.controllers:
            pids = int(self._read(os.path.join(path, "pids.current")))
        else:
            pids = len(self._procs(path))
        return Usage(
            memory_current=memory_current,
            memory_peak=peak,
            cpu_usec=cpu.get("usage_usec", 0),
            pids=pids,
            oom_kills=oom_kills,
        )

    def oom_kill_count(self, tenant: str) -> int:
        if "memory" not in self.controllers:
            return 0
        events = self._read(os.path.join(self._existing(tenant), "memory.events"))
        return _flat_keyed(events).get("oom_kill", 0)

    def oom_killed_since(self, tenant: str, mark: int) -> bool:
        return self.oom_kill_count(tenant) > mark

    def kill_all(self, tenant: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        path = self._dir(tenant)
        if self.fs.exists(path):
            self._kill_tree(path, timeout, f"tenant {tenant!r}")

    def _kill_tree(self, path: str, timeout: float, what: str) -> None:
        kill_file = os.path.join(path, "cgroup.kill")
        if self.fs.exists(kill_file):
            # cgroup.kill (Linux 5.14+) kills the whole subtree atomically, forks included.
            def kill(_pids: list[int]) -> None:
                self._write(kill_file, "1")

            kill_until_empty(lambda: self._procs_tree(path), timeout, what, kill)
        else:
            kill_until_empty(lambda: self._procs_tree(path), timeout, what)

    def _procs_tree(self, path: str) -> list[int]:
        pids = self._procs(path)
        with contextlib.suppress(FileNotFoundError):
            for child in self.fs.listdir(path):
                pids += self._procs_tree(os.path.join(path, child))
        return pids

    def remove(self, tenant: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        path = self._dir(tenant)
        self._peaks.pop(tenant, None)
        if self.fs.exists(path):
            self._remove_tree(path, timeout, f"tenant {tenant!r}")

    def _remove_tree(self, path: str, timeout: float, what: str) -> None:
        self._kill_tree(path, timeout, what)
        with contextlib.suppress(FileNotFoundError):
            for child in self.fs.listdir(path):
                self._remove_tree(os.path.join(path, child), timeout, what)
        rmdir_retry(path, timeout, f"cgroup v2: {what}", self.fs.rmdir)

    def tenants(self) -> list[str]:
        try:
            names = self.fs.listdir(self.base)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if is_valid_name(n))

    def cleanup_stale(self) -> list[str]:
        names = self.tenants()
        for name in names:
            self.remove(name)
        return names

    def applied(self, tenant: str) -> TenantLimits:
        path = self._existing(tenant)

        def read(name: str) -> str | None:
            try:
                return str(self.fs.read(os.path.join(path, name))).strip()
            except FileNotFoundError:
                return None

        def limit(text: str | None) -> int | None:
            return None if text in (None, "max") else int(text)  # type: ignore[arg-type]

        quota, _, period = (read("cpu.max") or "max").partition(" ")
        weight = read("cpu.weight")
        return TenantLimits(
            memory_max=limit(read("memory.max")),
            memory_high=limit(read("memory.high")),
            cpu_max=None if quota == "max" else round(int(quota) / int(period), 4),
            cpu_weight=None if weight in (None, "100") else int(weight),  # type: ignore[arg-type]
            pids_max=limit(read("pids.max")),
        )

    def subtree_dirs(self) -> list[str]:
        return [self.base]

    def exists(self, tenant: str) -> bool:
        return bool(self.fs.exists(self._dir(tenant)))

    def remove_subtree(self) -> None:
        if self.fs.exists(self.base):
            self._remove_tree(self.base, DEFAULT_TIMEOUT, "subtree")
        self._peaks.clear()
        self._ready = False


# --------------------------------------------------------------------------- detection


def probe(mounts: list[Mount], own: dict[str, str], subtree: str) -> tuple[V2Backend | None, str]:
    """A v2 backend if this host can run one, else None and the reason."""
    v2_mounts = [m for m in mounts if m.fstype == "cgroup2"]
    if not v2_mounts:
        return None, "no cgroup2 filesystem is mounted"
    self_path = own.get("")
    if self_path is None:
        return None, "/proc/self/cgroup has no line for the unified hierarchy ('0::/...')"
    for mount in v2_mounts:
        directory = cgroup_dir(mount, self_path)
        if directory is not None and os.path.isdir(directory):
            break
    else:
        where = ", ".join(m.mountpoint for m in v2_mounts)
        return None, f"our cgroup {self_path} is not visible under the cgroup2 mount at {where}"
    # A process started after the daemon moved itself into <own>/daemon sees that leaf as its
    # own cgroup; tenant groups still belong next to it, under <own>.
    parent = os.path.dirname(directory)
    if (
        os.path.basename(directory) == DAEMON_LEAF
        and directory != mount.mountpoint
        and os.path.isdir(os.path.join(parent, subtree))
    ):
        directory = parent
    rel = "/" + os.path.relpath(directory, mount.mountpoint)
    if rel == "/.":
        rel = "/"
    try:
        with open(os.path.join(directory, "cgroup.controllers")) as f:
            offered = f.read().split()
    except OSError as exc:
        return None, f"cannot read {directory}/cgroup.controllers: {exc.strerror}"
    missing = [c for c in REQUIRED_CONTROLLERS if c not in offered]
    if missing:
        return None, (
            f"cgroup2 at {mount.mountpoint}: our cgroup {rel} offers controllers "
            f"[{' '.join(offered)}], missing {', '.join(missing)} (attached to cgroup v1 "
            "hierarchies, or not delegated to us)"
        )
    for name in ("", "cgroup.procs", "cgroup.subtree_control"):
        path = os.path.join(directory, name) if name else directory
        if not os.access(path, os.W_OK):
            return None, f"{path} is not writable by uid {os.geteuid()} (not delegated to us)"
    reason = f"memory, cpu and pids offered to {rel} and writable"
    if rel != "/" and not _delegated(directory):
        reason += (
            "; not marked as delegated by systemd (if systemd manages this cgroup, run hourai "
            "with Delegate=yes so it does not undo our changes)"
        )
    return V2Backend(mount.mountpoint, rel, subtree, reason=reason), ""


def _delegated(directory: str) -> bool:
    # systemd 251+ marks delegated cgroups with this xattr (trusted. as root, user. otherwise)
    for attr in ("trusted.delegate", "user.delegate"):
        with contextlib.suppress(OSError):
            if os.getxattr(directory, attr) == b"1":
                return True
    return False
