"""The v2 backend, two ways.

1. Against :class:`FakeCgroupFS`: a temporary directory laid out like a cgroup2 mount, with
   the interface files a 6.x kernel creates (same names, same default contents, trailing
   newlines included), plus the kernel rules the backend depends on, enforced at the same
   operations: cgroup.controllers follows the parent's cgroup.subtree_control; enabling a
   controller the parent does not offer fails with ENOENT; enabling controllers in a
   non-root cgroup that has member processes fails with EBUSY (no internal processes);
   moving a pid into a cgroup with controllers enabled in subtree_control fails with EBUSY;
   rmdir of a populated cgroup or one with children fails with EBUSY; writing a read-only
   file fails with EACCES and a missing one with ENOENT; memory.max, cpu.max, cpu.weight and
   pids.max reject malformed values; a pid lives in exactly one cgroup; exited processes
   drop out of cgroup.procs; cgroup.kill SIGKILLs every member of the subtree.

   What the fake cannot prove: that a process is really moved (it records the pid, the
   process's /proc/<pid>/cgroup is untouched), that limits are enforced (no OOM kill,
   throttling or fork failure happens; tests write the counters themselves, the way the
   kernel would), the exact numbers the kernel reports, migration permission rules for
   non-root delegation, and systemd's behaviour around Delegate=yes.

2. Against the real cgroup2 mount of this host, where it exists and we are root, with the
   controllers that mount offers (on this host's hybrid layout: none of memory, cpu, pids;
   they are bound to v1). That covers what the fake cannot: real process membership,
   cgroup.kill, the no-internal-processes rule when a controller is enabled, and rmdir.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hourai.cgroup import CgroupError, TenantLimits, read_mounts, read_self_cgroups
from hourai.cgroup.v2 import CgroupFS, V2Backend

MiB = 1 << 20
PAGE = 4096
# The order a kernel lists controllers in (by subsystem id).
KERNEL_ORDER = ("cpuset", "cpu", "io", "memory", "hugetlb", "pids", "rdma", "misc")
PRESSURE = (
    "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
)
CPU_CONTROLLER_STAT = "nr_periods 0\nnr_throttled 0\nthrottled_usec 0\nnr_bursts 0\nburst_usec 0\n"

# Interface files of a non-root cgroup on Linux 6.x, with their contents after mkdir.
# None marks write-only files.
CORE_FILES: dict[str, str | None] = {
    "cgroup.controllers": "\n",
    "cgroup.subtree_control": "\n",
    "cgroup.procs": "",
    "cgroup.threads": "",
    "cgroup.events": "populated 0\nfrozen 0\n",
    "cgroup.type": "domain\n",
    "cgroup.freeze": "0\n",
    "cgroup.kill": None,
    "cgroup.max.depth": "max\n",
    "cgroup.max.descendants": "max\n",
    "cgroup.stat": "nr_descendants 0\nnr_dying_descendants 0\n",
    "cgroup.pressure": "1\n",
    "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\nnice_usec 0\n",
    "cpu.pressure": PRESSURE,
    "io.pressure": PRESSURE,
    "memory.pressure": PRESSURE,
}
CONTROLLER_FILES: dict[str, dict[str, str | None]] = {
    "memory": {
        "memory.current": "0\n",
        "memory.peak": "0\n",
        "memory.min": "0\n",
        "memory.low": "0\n",
        "memory.high": "max\n",
        "memory.max": "max\n",
        "memory.oom.group": "0\n",
        "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
        "memory.events.local": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
        "memory.swap.current": "0\n",
        "memory.swap.high": "max\n",
        "memory.swap.max": "max\n",
        "memory.swap.events": "high 0\nmax 0\nfail 0\n",
        "memory.stat": "anon 0\nfile 0\nkernel 0\nsock 0\nshmem 0\n",
    },
    "cpu": {
        "cpu.max": "max 100000\n",
        "cpu.max.burst": "0\n",
        "cpu.weight": "100\n",
        "cpu.weight.nice": "0\n",
        "cpu.idle": "0\n",
    },
    "pids": {
        "pids.max": "max\n",
        "pids.current": "0\n",
        "pids.peak": "0\n",
        "pids.events": "max 0\n",
    },
    "io": {"io.max": "", "io.stat": "", "io.weight": "default 100\n"},
    "cpuset": {"cpuset.cpus": "\n", "cpuset.mems": "\n", "cpuset.cpus.effective": "0-1\n"},
}
WRITABLE = {
    "cgroup.subtree_control", "cgroup.procs", "cgroup.threads", "cgroup.type", "cgroup.freeze",
    "cgroup.kill", "cgroup.max.depth", "cgroup.max.descendants", "cgroup.pressure",
    "cpu.pressure", "io.pressure", "memory.pressure", "memory.peak", "memory.min",
    "memory.low", "memory.high", "memory.max", "memory.oom.group", "memory.swap.high",
    "memory.swap.max", "cpu.max", "cpu.max.burst", "cpu.weight", "cpu.weight.nice",
    "cpu.idle", "pids.max", "io.max", "io.weight", "cpuset.cpus", "cpuset.mems",
}  # fmt: skip


def _err(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


def _gone(pid: int) -> bool:
    """Exited (or a zombie): the kernel drops it from cgroup.procs at exit, before reaping."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


class FakeCgroupFS(CgroupFS):
    """cgroupfs semantics over a temporary directory (see the module docstring)."""

    def __init__(self, mount: Path, root_controllers: tuple[str, ...] = KERNEL_ORDER[:6]) -> None:
        self.mount = mount
        self.kills: list[str] = []  # groups whose cgroup.kill was written
        mount.mkdir(parents=True, exist_ok=True)
        (mount / "cgroup.controllers").write_text(self._ordered(root_controllers) + "\n")
        (mount / "cgroup.subtree_control").write_text("\n")
        (mount / "cgroup.procs").write_text("")
        (mount / "cpu.stat").write_text(CORE_FILES["cpu.stat"] or "")

    # -- helpers for tests acting as the kernel

    @staticmethod
    def _ordered(names: object) -> str:
        return " ".join(c for c in KERNEL_ORDER if c in names)  # type: ignore[operator]

    def group(self, path: str) -> Path:
        """The directory of cgroup ``path`` (``"/a/b"``)."""
        return self.mount / path.lstrip("/")

    def make_group(self, path: str, procs: list[int] = ()) -> Path:  # type: ignore[assignment]
        """Create cgroup ``path`` (and its parents) holding ``procs``, like systemd would."""
        directory = self.mount
        for part in path.strip("/").split("/"):
            directory = directory / part
            self.mkdir(str(directory))
        for pid in procs:
            self.write(str(directory / "cgroup.procs"), str(pid))
        return directory

    def set(self, group: Path, name: str, content: str) -> None:
        """Change a counter the way the kernel would (memory.current, memory.events...)."""
        (group / name).write_text(content)

    def oom_kill(self, group: Path) -> None:
        events = dict(line.split() for line in (group / "memory.events").read_text().splitlines())
        for key in ("max", "oom", "oom_kill"):
            events[key] = str(int(events[key]) + 1)
        (group / "memory.events").write_text("".join(f"{k} {v}\n" for k, v in events.items()))

    # -- the kernel's side of the operations the backend uses

    def _is_root(self, directory: Path) -> bool:
        return directory == self.mount

    def _procs_of(self, directory: Path) -> list[int]:
        path = directory / "cgroup.procs"
        pids = [int(p) for p in path.read_text().split()]
        alive = [p for p in pids if not _gone(p)]
        if alive != pids:
            path.write_text("".join(f"{p}\n" for p in alive))
            self._update_counts(directory)
        return alive

    def _update_counts(self, directory: Path) -> None:
        count = len([int(p) for p in (directory / "cgroup.procs").read_text().split()])
        if (directory / "pids.current").exists():
            (directory / "pids.current").write_text(f"{count}\n")
        if (directory / "cgroup.events").exists():
            (directory / "cgroup.events").write_text(f"populated {int(count > 0)}\nfrozen 0\n")

    def _children(self, directory: Path) -> list[Path]:
        return [p for p in directory.iterdir() if p.is_dir()]

    def _all_groups(self) -> Iterator[Path]:
        yield self.mount
        for dirpath, dirnames, _files in os.walk(self.mount):
            for d in dirnames:
                yield Path(dirpath, d)

    def read(self, path: str) -> str:
        p = Path(path)
        if p.name in CORE_FILES and CORE_FILES[p.name] is None:
            raise _err(errno.EACCES, path)  # write-only
        if p.name == "cgroup.procs" and p.exists():
            self._procs_of(p.parent)
        return super().read(path)

    def write(self, path: str, data: str) -> None:
        p = Path(path)
        if not p.exists():
            raise _err(errno.ENOENT, path)
        if p.name not in WRITABLE:
            raise _err(errno.EACCES, path)
        handler = getattr(self, "_write_" + p.name.replace(".", "_"), None)
        if handler is not None:
            handler(p.parent, data.strip(), path)
        else:
            p.write_text(data.strip() + "\n")

    def _write_cgroup_procs(self, group: Path, data: str, path: str) -> None:
        if not data.isdigit():
            raise _err(errno.EINVAL, path)
        pid = int(data)
        if _gone(pid):
            raise _err(errno.ESRCH, path)
        if not self._is_root(group) and (group / "cgroup.subtree_control").read_text().split():
            raise _err(errno.EBUSY, path)  # no internal processes
        for other in self._all_groups():
            pids = self._procs_of(other)
            if pid in pids:
                pids.remove(pid)
                (other / "cgroup.procs").write_text("".join(f"{q}\n" for q in pids))
                self._update_counts(other)
        with open(group / "cgroup.procs", "a") as f:
            f.write(f"{pid}\n")
        self._update_counts(group)

    def _write_cgroup_subtree_control(self, group: Path, data: str, path: str) -> None:
        offered = set((group / "cgroup.controllers").read_text().split())
        enabled = set((group / "cgroup.subtree_control").read_text().split())
        for token in data.split():
            sign, name = token[:1], token[1:]
            if sign not in "+-" or not name:
                raise _err(errno.EINVAL, path)
            if name not in offered:
                raise _err(errno.ENOENT, path)
            if sign == "+":
                if name not in enabled and not self._is_root(group) and self._procs_of(group):
                    raise _err(errno.EBUSY, path)
                enabled.add(name)
            else:
                for child in self._children(group):
                    if name in (child / "cgroup.subtree_control").read_text().split():
                        raise _err(errno.EBUSY, path)
                enabled.discard(name)
        (group / "cgroup.subtree_control").write_text(self._ordered(enabled) + "\n")
        for child in self._children(group):
            self._populate(child, enabled)

    def _write_cgroup_kill(self, group: Path, data: str, path: str) -> None:
        if data != "1":
            raise _err(errno.EINVAL, path)
        self.kills.append(str(group))
        for dirpath, _dirs, _files in os.walk(group):
            for pid in self._procs_of(Path(dirpath)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _write_limit(self, group: Path, name: str, data: str, path: str, page: int) -> None:
        if data == "max":
            (group / name).write_text("max\n")
        elif data.isdigit():
            (group / name).write_text(f"{int(data) // page * page}\n")
        else:
            raise _err(errno.EINVAL, path)

    def _write_memory_max(self, group: Path, data: str, path: str) -> None:
        self._write_limit(group, "memory.max", data, path, PAGE)

    def _write_memory_high(self, group: Path, data: str, path: str) -> None:
        self._write_limit(group, "memory.high", data, path, PAGE)

    def _write_memory_swap_max(self, group: Path, data: str, path: str) -> None:
        self._write_limit(group, "memory.swap.max", data, path, PAGE)

    def _write_pids_max(self, group: Path, data: str, path: str) -> None:
        if data != "max" and not (data.isdigit() and int(data) <= 4194304):
            raise _err(errno.EINVAL, path)
        (group / "pids.max").write_text(data + "\n")

    def _write_cpu_max(self, group: Path, data: str, path: str) -> None:
        parts = data.split()
        period = int((group / "cpu.max").read_text().split()[1])
        if len(parts) == 2:
            if not parts[1].isdigit():
                raise _err(errno.EINVAL, path)
            period = int(parts[1])
        if len(parts) not in (1, 2) or not 1000 <= period <= 1_000_000:
            raise _err(errno.EINVAL, path)
        quota = parts[0]
        if quota != "max" and not (quota.isdigit() and int(quota) >= 1000):
            raise _err(errno.EINVAL, path)
        (group / "cpu.max").write_text(f"{quota} {period}\n")

    def _write_cpu_weight(self, group: Path, data: str, path: str) -> None:
        if not data.isdigit():
            raise _err(errno.EINVAL, path)
        if not 1 <= int(data) <= 10000:
            raise _err(errno.ERANGE, path)
        (group / "cpu.weight").write_text(data + "\n")

    def _populate(self, group: Path, controllers: set[str]) -> None:
        """Make a group's files match the controllers its parent enables for it."""
        (group / "cgroup.controllers").write_text(self._ordered(controllers) + "\n")
        for controller, files in CONTROLLER_FILES.items():
            for name, content in files.items():
                f = group / name
                if controller in controllers and not f.exists():
                    f.write_text(content or "")
                elif controller not in controllers and f.exists():
                    f.unlink()

    def mkdir(self, path: str) -> None:
        p = Path(path)
        if p.is_dir():
            return
        os.mkdir(p)  # FileNotFoundError if the parent is missing, as in cgroupfs
        for name, content in CORE_FILES.items():
            (p / name).write_text(content or "")
        if (p / "cpu.stat").exists() and "cpu" in (
            p.parent / "cgroup.subtree_control"
        ).read_text().split():
            with open(p / "cpu.stat", "a") as f:
                f.write(CPU_CONTROLLER_STAT)
        self._populate(p, set((p.parent / "cgroup.subtree_control").read_text().split()))

    def rmdir(self, path: str) -> None:
        p = Path(path)
        if not p.is_dir():
            raise _err(errno.ENOENT, path)
        if self._procs_of(p) or self._children(p):
            raise _err(errno.EBUSY, path)
        for f in p.iterdir():
            f.unlink()
        os.rmdir(p)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def sleepers() -> Iterator[Callable[[], int]]:
    """Start real `sleep` processes; each is killed by pid and reaped when the test ends."""
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> int:
        proc = subprocess.Popen(["sleep", "60"])
        procs.append(proc)
        return proc.pid

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def exit_signal(pid: int) -> int:
    """Reap our child ``pid`` and return the signal that killed it (0 if it exited)."""
    _pid, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


SERVICE = "/system.slice/hourai.service"


@pytest.fixture
def fake(tmp_path: Path, sleepers: Callable[[], int]) -> FakeCgroupFS:
    """A cgroup2 mount where systemd put the daemon (a stand-in sleeper) in SERVICE, with
    memory, cpu and pids delegated to it."""
    fs = FakeCgroupFS(tmp_path / "cgroup")
    fs.write(str(fs.mount / "cgroup.subtree_control"), "+memory +cpu +pids +io")
    fs.make_group("/system.slice")
    fs.write(str(fs.group("/system.slice") / "cgroup.subtree_control"), "+memory +cpu +pids")
    fs.make_group(SERVICE, [sleepers()])
    return fs


def backend_on(fs: FakeCgroupFS, self_cgroup: str = SERVICE) -> V2Backend:
    return V2Backend(str(fs.mount), self_cgroup, "hourai", fs=fs)


def text(group: Path, name: str) -> str:
    return (group / name).read_text()


# --------------------------------------------------------------------------- the fake itself


def test_the_fake_enforces_the_rules_the_backend_relies_on(fake: FakeCgroupFS) -> None:
    service = fake.group(SERVICE)
    control = str(service / "cgroup.subtree_control")
    with pytest.raises(OSError) as busy:
        fake.write(control, "+memory")  # the service holds a process
    assert busy.value.errno == errno.EBUSY
    with pytest.raises(OSError) as absent:
        fake.write(control, "+hugetlb")  # not offered by the parent
    assert absent.value.errno == errno.ENOENT
    with pytest.raises(OSError) as readonly:
        fake.write(str(service / "memory.current"), "0")
    assert readonly.value.errno == errno.EACCES
    with pytest.raises(OSError) as busy_rmdir:
        fake.rmdir(str(service))
    assert busy_rmdir.value.errno == errno.EBUSY
    assert text(service, "cgroup.controllers") == "cpu memory pids\n"
    assert not (service / "io.max").exists()


# --------------------------------------------------------------------------- setup


def test_first_create_moves_the_daemon_to_a_leaf_then_delegates(
    fake: FakeCgroupFS, sleepers: Callable[[], int]
) -> None:
    service = fake.group(SERVICE)
    others = [int(p) for p in text(service, "cgroup.procs").split()]
    helper = sleepers()
    fake.write(str(service / "cgroup.procs"), str(helper))
    backend = backend_on(fake)

    backend.create("acme", TenantLimits())

    assert text(service, "cgroup.procs") == ""
    assert sorted(int(p) for p in text(service / "daemon", "cgroup.procs").split()) == sorted(
        [*others, helper]
    )
    assert text(service, "cgroup.subtree_control") == "cpu memory pids\n"
    assert text(service / "hourai", "cgroup.subtree_control") == "cpu memory pids\n"
    assert text(service / "hourai" / "acme", "cgroup.controllers") == "cpu memory pids\n"
    assert backend.tenants() == ["acme"]
    # idempotent: a second backend (a restarted daemon) finds everything in place
    backend_on(fake).create("acme", TenantLimits())
    assert backend_on(fake).tenants() == ["acme"]


def test_at_the_root_cgroup_nothing_moves(tmp_path: Path, sleepers: Callable[[], int]) -> None:
    fs = FakeCgroupFS(tmp_path / "cgroup")
    fs.write(str(fs.mount / "cgroup.procs"), str(sleepers()))
    backend = backend_on(fs, "/")
    backend.create("acme", TenantLimits(pids_max=3))
    assert not (fs.mount / "daemon").exists()
    assert text(fs.mount / "hourai" / "acme", "pids.max") == "3\n"


def test_missing_delegation_is_an_error_that_says_which_file(tmp_path: Path) -> None:
    fs = FakeCgroupFS(tmp_path / "cgroup")
    fs.write(str(fs.mount / "cgroup.subtree_control"), "+memory +cpu")  # no pids for us
    fs.make_group("/svc")
    with pytest.raises(CgroupError, match=r"svc/cgroup.subtree_control"):
        backend_on(fs, "/svc").create("acme", TenantLimits())


# --------------------------------------------------------------------------- limits


def test_limits_are_written_in_the_kernel_formats(fake: FakeCgroupFS) -> None:
    backend = backend_on(fake)
    limits = TenantLimits(
        memory_max=64 * MiB, memory_high=48 * MiB, cpu_max=0.5, cpu_weight=200, pids_max=20
    )
    backend.create("acme", limits)
    group = fake.group(SERVICE) / "hourai" / "acme"
    assert text(group, "memory.max") == f"{64 * MiB}\n"
    assert text(group, "memory.high") == f"{48 * MiB}\n"
    assert text(group, "memory.swap.max") == "0\n"
    assert text(group, "cpu.max") == "50000 100000\n"
    assert text(group, "cpu.weight") == "200\n"
    assert text(group, "pids.max") == "20\n"

    backend.set_limits("acme", TenantLimits(cpu_max=2.5))
    assert text(group, "memory.max") == "max\n"
    assert text(group, "memory.high") == "max\n"
    assert text(group, "memory.swap.max") == "max\n"
    assert text(group, "cpu.max") == "250000 100000\n"
    assert text(group, "cpu.weight") == "100\n"
    assert text(group, "pids.max") == "max\n"


def test_the_smallest_cpu_share_is_the_kernels_minimum_quota(fake: FakeCgroupFS) -> None:
    backend = backend_on(fake)
    backend.create("tiny", TenantLimits(cpu_max=0.01))
    assert text(fake.group(SERVICE) / "hourai" / "tiny", "cpu.max") == "1000 100000\n"


def test_without_swap_accounting_memory_max_still_applies(fake: FakeCgroupFS) -> None:
    backend = backend_on(fake)
    backend.create("acme", TenantLimits())
    group = fake.group(SERVICE) / "hourai" / "acme"
    (group / "memory.swap.max").unlink()  # kernel built without CONFIG_SWAP
    backend.set_limits("acme", TenantLimits(memory_max=32 * MiB))
    assert text(group, "memory.max") == f"{32 * MiB}\n"


# --------------------------------------------------------------------------- usage


def test_usage_reads_the_kernel_counters(fake: FakeCgroupFS, sleepers: Callable[[], int]) -> None:
    backend = backend_on(fake)
    backend.create("acme", TenantLimits(memory_max=128 * MiB))
    group = fake.group(SERVICE) / "hourai" / "acme"
    backend.place("acme", sleepers())
    backend.place("acme", sleepers())
    fake.set(group, "memory.current", f"{40 * MiB}\n")
    fake.set(group, "memory.peak", f"{90 * MiB}\n")
    fake.set(group, "cpu.stat", "usage_usec 123456\nuser_usec 100000\nsystem_usec 23456\n")
    fake.oom_kill(group)

    assert backend.usage("acme").__dict__ == {
        "memory_current": 40 * MiB,
        "memory_peak": 90 * MiB,
        "cpu_usec": 123456,
        "pids": 2,
        "oom_kills": 1,
    }


def test_without_memory_peak_the_peak_is_the_highest_value_read(fake: FakeCgroupFS) -> None:
    backend = backend_on(fake)
    backend.create("acme", TenantLimits())
    group = fake.group(SERVICE) / "hourai" / "acme"
    (group / "memory.peak").unlink()  # kernels before 5.19
    peaks = []
    for current in (10 * MiB, 30 * MiB, 20 * MiB):
        fake.set(group, "memory.current", f"{current}\n")
        peaks.append(backend.usage("acme").memory_peak)
    assert peaks == [10 * MiB, 30 * MiB, 30 * MiB]


def test_oom_kills_are_seen_relative_to_a_mark(fake: FakeCgroupFS) -> None:
    backend = backend_on(fake)
    backend.create("acme", TenantLimits(memory_max=64 * MiB))
    group = fake.group(SERVICE) / "hourai" / "acme"
    mark = backend.oom_kill_count("acme")
    assert not backend.oom_killed_since("acme", mark)
    fake.oom_kill(group)
    assert backend.oom_killed_since("acme", mark)
    assert not backend.oom_killed_since("acme", backend.oom_kill_count("acme"))


# --------------------------------------------------------------------------- membership


def test_place_and_join_write_cgroup_procs(fake: FakeCgroupFS, sleepers: Callable[[], int]) -> None:
    backend = backend_on(fake)
    backend.create("a", TenantLimits())
    backend.create("b", TenantLimits())
    pid = sleepers()
    backend.place("a", pid)
    assert backend.pids("a") == [pid]
    backend.place("b", pid)  # a process is in one cgroup at a time
    assert backend.pids("a") == []
    assert backend.pids("b") == [pid]
    backend.join("a")
    assert backend.pids("a") == [os.getpid()]
    assert backend.procs_files("a") == [str(fake.group(SERVICE) / "hourai" / "a" / "cgroup.procs")]


def test_placing_a_dead_pid_or_into_a_missing_group_fails(fake: FakeCgroupFS) -> None:
    backend = backend_on(fake)
    backend.create("acme", TenantLimits())
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(CgroupError, match="no such process"):
        backend.place("acme", proc.pid)
    with pytest.raises(CgroupError, match="create"):
        backend.place("nobody", os.getpid())
    with pytest.raises(CgroupError, match="invalid tenant name"):
        backend.place("Nobody", os.getpid())


# --------------------------------------------------------------------------- teardown


def test_kill_all_uses_cgroup_kill(fake: FakeCgroupFS, sleepers: Callable[[], int]) -> None:
    backend = backend_on(fake)
    backend.create("acme", TenantLimits())
    pids = [sleepers(), sleepers()]
    for pid in pids:
        backend.place("acme", pid)
    backend.kill_all("acme")
    # (written again if the group is not empty yet at the next look: a loaded machine)
    assert set(fake.kills) == {str(fake.group(SERVICE) / "hourai" / "acme")}
    assert backend.pids("acme") == []
    assert [exit_signal(pid) for pid in pids] == [signal.SIGKILL, signal.SIGKILL]


def test_kill_all_without_cgroup_kill_signals_each_pid(
    fake: FakeCgroupFS, sleepers: Callable[[], int]
) -> None:
    backend = backend_on(fake)
    backend.create("acme", TenantLimits())
    (fake.group(SERVICE) / "hourai" / "acme" / "cgroup.kill").unlink()  # before Linux 5.14
    pid = sleepers()
    backend.place("acme", pid)
    backend.kill_all("acme")
    assert fake.kills == []
    assert backend.pids("acme") == []
    assert exit_signal(pid) == signal.SIGKILL


def test_remove_is_idempotent_and_cleanup_finds_leftovers(
    fake: FakeCgroupFS, sleepers: Callable[[], int]
) -> None:
    crashed = backend_on(fake)
    crashed.create("ghost", TenantLimits())
    crashed.create("other", TenantLimits())
    pid = sleepers()
    crashed.place("ghost", pid)

    restarted = backend_on(fake)
    assert restarted.tenants() == ["ghost", "other"]
    restarted.remove("other")
    restarted.remove("other")
    assert restarted.cleanup_stale() == ["ghost"]
    assert exit_signal(pid) == signal.SIGKILL
    assert restarted.tenants() == []
    restarted.remove_subtree()
    assert not (fake.group(SERVICE) / "hourai").exists()


# --------------------------------------------------------------------------- the real kernel


def _real_mount() -> tuple[str, str]:
    if os.geteuid() != 0:
        pytest.skip(f"needs root to create cgroups (running as uid {os.geteuid()})")
    mounts = [m for m in read_mounts() if m.fstype == "cgroup2"]
    if not mounts:
        pytest.skip("no cgroup2 filesystem is mounted on this host")
    own = read_self_cgroups().get("")
    if own is None:
        pytest.skip("/proc/self/cgroup has no unified-hierarchy line")
    mount = mounts[0].mountpoint
    if not os.access(mount, os.W_OK):
        pytest.skip(f"the cgroup2 mount {mount} is read-only")
    return mount, own


def _remove_scratch(directory: Path, self_cgroup: str) -> None:
    mount = str(directory)[: -len(self_cgroup)] or "/"
    backend = V2Backend(mount, self_cgroup, "hourai", controllers=())
    backend.remove_subtree()
    for group in [directory / "daemon", directory]:
        if group.exists():
            backend._remove_tree(str(group), 5.0, "test cleanup")


@pytest.fixture
def real() -> Iterator[tuple[Path, str]]:
    """A scratch cgroup on the real cgroup2 mount, standing in for the daemon's own cgroup."""
    mount, own = _real_mount()
    name = f"hourai-test-{os.getpid()}-v2"
    self_cgroup = f"{own.rstrip('/')}/{name}"
    directory = Path(mount, self_cgroup.lstrip("/"))
    try:
        directory.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup in {directory.parent}: {exc.strerror}")
    try:
        yield directory, self_cgroup
    finally:
        _remove_scratch(directory, self_cgroup)
    assert not directory.exists()


def _proc_cgroup(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"pid {pid} has no unified cgroup line")


def test_real_kernel_membership_kill_and_removal(
    real: tuple[Path, str], sleepers: Callable[[], int]
) -> None:
    directory, self_cgroup = real
    mount = str(directory)[: -len(self_cgroup)] or "/"
    backend = V2Backend(mount, self_cgroup, "hourai", controllers=())
    backend.create("acme", TenantLimits())
    with pytest.raises(CgroupError, match="memory controller is not enabled"):
        backend.set_limits("acme", TenantLimits(memory_max=64 * MiB))

    pid = sleepers()
    backend.place("acme", pid)
    assert _proc_cgroup(pid) == f"{self_cgroup}/hourai/acme"
    assert backend.pids("acme") == [pid]
    assert backend.usage("acme").pids == 1

    shell = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    try:
        backend.place("acme", shell.pid)  # its later children are born in the group
        backend.kill_all("acme")  # cgroup.kill, by the kernel
        assert backend.pids("acme") == []
        assert shell.wait(timeout=10) == -signal.SIGKILL
        assert exit_signal(pid) == signal.SIGKILL
    finally:
        if shell.poll() is None:
            os.kill(shell.pid, signal.SIGKILL)
        shell.wait(timeout=10)

    backend.remove("acme")
    backend.remove("acme")
    assert not (directory / "hourai" / "acme").exists()


@pytest.fixture
def offered_controller(real: tuple[Path, str]) -> Iterator[str]:
    """A controller the scratch cgroup's parent enables for it, enabling one if needed.

    On this host's hybrid layout the unified root offers only hugetlb and enables nothing;
    enabling it at the root for the length of the test is harmless and undone afterwards.
    """
    directory, self_cgroup = real
    parent_control = directory.parent / "cgroup.subtree_control"
    enabled = parent_control.read_text().split()
    if enabled:
        yield enabled[0]
        return
    offered = (directory.parent / "cgroup.controllers").read_text().split()
    if not offered:
        pytest.skip(f"{directory.parent} offers no controller to enable for its children")
    try:
        CgroupFS().write(str(parent_control), f"+{offered[0]}")
    except OSError as exc:
        pytest.skip(f"cannot enable {offered[0]} in {parent_control}: {exc.strerror}")
    try:
        yield offered[0]
    finally:
        _remove_scratch(directory, self_cgroup)  # the controller is in use until then
        with contextlib.suppress(OSError):  # still in use by a cgroup we did not create
            CgroupFS().write(str(parent_control), f"-{offered[0]}")


def test_real_kernel_no_internal_processes_rule(
    real: tuple[Path, str], offered_controller: str, sleepers: Callable[[], int]
) -> None:
    """With a controller enabled, the daemon-leaf sequence must satisfy the real kernel."""
    directory, self_cgroup = real
    controller = offered_controller
    mount = str(directory)[: -len(self_cgroup)] or "/"
    daemon = sleepers()
    (directory / "cgroup.procs").write_text(str(daemon))
    with pytest.raises(OSError) as busy:  # what the backend must avoid
        CgroupFS().write(str(directory / "cgroup.subtree_control"), f"+{controller}")
    assert busy.value.errno == errno.EBUSY

    backend = V2Backend(mount, self_cgroup, "hourai", controllers=(controller,))
    backend.create("acme", TenantLimits())
    assert _proc_cgroup(daemon) == f"{self_cgroup}/daemon"
    assert controller in (directory / "hourai" / "acme" / "cgroup.controllers").read_text()
    worker = sleepers()
    backend.place("acme", worker)
    assert _proc_cgroup(worker) == f"{self_cgroup}/hourai/acme"
