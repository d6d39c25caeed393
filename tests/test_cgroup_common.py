"""Detection, the shared types, and the ``none`` backend.

Detection runs twice: on this host (which must pick v1, and say why v2 is out), and on fake
hosts built in a temporary directory (``detect(root=...)`` reads ``proc/self/mountinfo``,
``proc/self/cgroup`` and the mount points under it), one per layout we expect in the wild.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hourai.cgroup import (
    CgroupBackend,
    CgroupError,
    TenantLimits,
    Usage,
    detect,
    read_mounts,
    read_self_cgroups,
    validate_name,
)
from hourai.cgroup.none import NoneBackend
from hourai.cgroup.v1 import Hierarchy, V1Backend
from hourai.cgroup.v2 import V2Backend

MiB = 1 << 20


# --------------------------------------------------------------------------- this host


def test_this_host_gets_v1_and_the_log_line_says_why() -> None:
    if os.geteuid() != 0:
        pytest.skip(f"v1 needs root; running as uid {os.geteuid()}")
    mounts = read_mounts()
    if not any(m.fstype == "cgroup" and "memory" in m.options for m in mounts):
        pytest.skip("no cgroup v1 memory hierarchy on this host")
    v2 = [m for m in mounts if m.fstype == "cgroup2"]
    if v2 and "memory" in Path(v2[0].mountpoint, "cgroup.controllers").read_text().split():
        pytest.skip("this host's cgroup2 mount has the memory controller: v2 would be right")

    backend = detect()

    assert backend.name == "v1"
    assert isinstance(backend, V1Backend)
    assert backend.warning is None
    line = backend.describe()
    assert line.startswith("cgroup v1: tenant groups in memory ")
    own_memory = read_self_cgroups()["memory"]
    assert f"{own_memory.rstrip('/')}/hourai" in line  # below our own cgroup, not the root
    if v2:
        assert f"v2 not usable: cgroup2 at {v2[0].mountpoint}" in line
        assert "missing memory, cpu, pids" in line


def test_forcing_v2_on_this_host_explains_what_to_do() -> None:
    mounts = read_mounts()
    v2 = [m for m in mounts if m.fstype == "cgroup2"]
    if not v2 or "memory" in Path(v2[0].mountpoint, "cgroup.controllers").read_text().split():
        pytest.skip("this host's cgroup2 mount is usable or absent; nothing to refuse")
    with pytest.raises(CgroupError, match=r"cgroup v2 is not usable: .*Delegate=yes"):
        detect("v2")


# --------------------------------------------------------------------------- fake hosts


class FakeHost:
    """A directory tree that looks like / to detect(): /proc/self files and cgroup mounts."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mountinfo: list[str] = []
        self.cgroup: list[str] = []
        self._next_id = 30

    def mount(self, where: str, fstype: str, options: str, mount_root: str = "/") -> Path:
        self._next_id += 1
        where_escaped = where.replace(" ", "\\040")
        self.mountinfo.append(
            f"{self._next_id} 23 0:{self._next_id} {mount_root} {where_escaped} rw,relatime "
            f"shared:9 - {fstype} {fstype} rw,{options}".rstrip(",")
        )
        path = self.root / where.lstrip("/")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def member(self, hierarchy_id: int, controllers: str, path: str) -> None:
        self.cgroup.append(f"{hierarchy_id}:{controllers}:{path}")

    def write(self) -> str:
        proc = self.root / "proc" / "self"
        proc.mkdir(parents=True, exist_ok=True)
        (proc / "mountinfo").write_text("\n".join(self.mountinfo) + "\n")
        (proc / "cgroup").write_text("\n".join(self.cgroup) + "\n")
        return str(self.root)


def v2_host(tmp_path: Path, offered: str, self_cgroup: str = "/system.slice/x.service") -> str:
    host = FakeHost(tmp_path)
    mount = host.mount("/sys/fs/cgroup", "cgroup2", "nsdelegate")
    own = mount / self_cgroup.lstrip("/")
    own.mkdir(parents=True, exist_ok=True)
    (own / "cgroup.controllers").write_text(offered + "\n")
    (own / "cgroup.procs").write_text("")
    (own / "cgroup.subtree_control").write_text("\n")
    host.member(0, "", self_cgroup)
    return host.write()


def hybrid_host(tmp_path: Path, *, comount: bool = False, with_pids: bool = True) -> str:
    """This host's layout: v1 controllers, a cgroup2 mount with only hugetlb."""
    host = FakeHost(tmp_path)
    if comount:
        host.mount("/sys/fs/cgroup/cpu,cpuacct", "cgroup", "cpu,cpuacct")
        host.member(2, "cpu,cpuacct", "/")
    else:
        host.mount("/sys/fs/cgroup/cpu", "cgroup", "cpu")
        host.mount("/sys/fs/cgroup/cpuacct", "cgroup", "cpuacct")
        host.member(2, "cpu", "/")
        host.member(3, "cpuacct", "/")
    memory = host.mount("/sys/fs/cgroup/memory", "cgroup", "memory")
    (memory / "process_api" / "ab12").mkdir(parents=True)
    host.member(4, "memory", "/process_api/ab12")
    if with_pids:
        host.mount("/sys/fs/cgroup/pids", "cgroup", "pids")
        host.member(8, "pids", "/")
    host.mount("/sys/fs/cgroup/systemd", "cgroup", "name=systemd")
    host.member(9, "name=systemd", "/")
    unified = host.mount("/sys/fs/cgroup/unified", "cgroup2", "")
    (unified / "cgroup.controllers").write_text("hugetlb\n")
    host.member(0, "", "/")
    return host.write()


def test_a_delegated_unified_hierarchy_gets_v2(tmp_path: Path) -> None:
    root = v2_host(tmp_path, "cpuset cpu io memory pids")
    backend = detect(root=root, subtree="hourai")
    assert isinstance(backend, V2Backend)
    assert backend.base == str(tmp_path / "sys/fs/cgroup/system.slice/x.service/hourai")
    assert backend.describe().startswith(f"cgroup v2: tenant groups in {backend.base}")
    assert "Delegate=yes" in backend.describe()  # no systemd delegate mark on a temp dir
    assert backend.warning is None


def test_a_process_already_in_the_daemon_leaf_keeps_the_same_groups(tmp_path: Path) -> None:
    # The zygote starts after the daemon moved into <own>/daemon; it must find <own>/hourai.
    root = v2_host(tmp_path, "cpu memory pids", "/system.slice/x.service/daemon")
    service = tmp_path / "sys/fs/cgroup/system.slice/x.service"
    for name, content in [("cgroup.controllers", "cpu memory pids\n"), ("cgroup.procs", "")]:
        (service / name).write_text(content)
    (service / "cgroup.subtree_control").write_text("cpu memory pids\n")
    (service / "hourai").mkdir()
    backend = detect(root=root)
    assert isinstance(backend, V2Backend)
    assert backend.self_cgroup == "/system.slice/x.service"


@pytest.mark.parametrize("offered", ["cpu memory", "hugetlb", ""])
def test_v2_without_memory_cpu_and_pids_falls_through(tmp_path: Path, offered: str) -> None:
    root = v2_host(tmp_path, offered)
    with pytest.raises(CgroupError) as info:
        detect("v2", root=root)
    assert f"offers controllers [{offered}]" in str(info.value)
    backend = detect(root=root)  # no v1 mounts either
    assert backend.name == "none"
    assert backend.warning is not None and "missing" in backend.warning


def test_this_hosts_layout_gets_v1_below_our_own_memory_cgroup(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"v1 detection requires root; running as uid {os.geteuid()}")
    backend = detect(root=hybrid_host(tmp_path))
    assert isinstance(backend, V1Backend)
    assert backend.hierarchies["memory"].own == "/process_api/ab12"
    assert backend.hierarchies["cpu"].mount == str(tmp_path / "sys/fs/cgroup/cpu")
    assert backend.hierarchies["cpuacct"].mount == str(tmp_path / "sys/fs/cgroup/cpuacct")
    assert str(tmp_path / "sys/fs/cgroup/memory/process_api/ab12/hourai") in backend._base_dirs()
    assert "offers controllers [hugetlb]" in backend.describe()


def test_comounted_cpu_and_cpuacct_share_one_directory(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"v1 detection requires root; running as uid {os.geteuid()}")
    backend = detect("v1", root=hybrid_host(tmp_path, comount=True))
    assert isinstance(backend, V1Backend)
    assert backend.hierarchies["cpu"].mount == backend.hierarchies["cpuacct"].mount
    assert len(backend._base_dirs()) == 3  # memory, cpu+cpuacct, pids


def test_a_missing_pids_hierarchy_rules_out_v1(tmp_path: Path) -> None:
    root = hybrid_host(tmp_path, with_pids=False)
    with pytest.raises(CgroupError, match="cgroup v1 is not usable: no pids hierarchy"):
        detect("v1", root=root)
    backend = detect(root=root)
    assert isinstance(backend, NoneBackend)


def test_a_host_without_cgroups_gets_none_with_a_loud_warning(tmp_path: Path) -> None:
    root = FakeHost(tmp_path).write()
    backend = detect(root=root)
    assert backend.name == "none"
    assert backend.warning is not None
    assert "NOT contained" in backend.warning
    assert "no cgroup2 filesystem is mounted" in backend.warning
    assert "Delegate=yes" in backend.warning
    assert "tenants are not contained" in backend.describe()
    with pytest.raises(CgroupError, match="cgroup v1 is not usable"):
        detect("v1", root=root)


def test_unreadable_proc_is_reported_not_raised(tmp_path: Path) -> None:
    backend = detect(root=str(tmp_path))
    assert backend.name == "none"
    assert "cannot read /proc/self" in (backend.warning or "")


def test_detect_rejects_bad_arguments() -> None:
    with pytest.raises(CgroupError, match="unknown cgroup backend 'v3'"):
        detect("v3")
    with pytest.raises(CgroupError, match="invalid cgroup subtree name"):
        detect("none", subtree="../up")


def test_mountinfo_parsing_handles_escapes_and_mount_roots(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    host.mount("/sys/fs/cgroup/my memory", "cgroup", "memory", mount_root="/outer")
    host.mount("/sys/fs/cgroup/pids", "cgroup", "pids")
    host.member(4, "memory", "/outer/inner")
    host.member(1, "cpu,cpuacct", "/x")
    host.member(0, "", "/")
    root = host.write()
    mounts = read_mounts(root)
    assert [m.mountpoint for m in mounts] == [
        str(tmp_path / "sys/fs/cgroup/my memory"),
        str(tmp_path / "sys/fs/cgroup/pids"),
    ]
    assert mounts[0].root == "/outer"
    assert "memory" in mounts[0].options
    assert read_self_cgroups(root) == {
        "memory": "/outer/inner",
        "cpu": "/x",
        "cpuacct": "/x",
        "": "/",
    }


# --------------------------------------------------------------------------- shared types


@pytest.mark.parametrize("name", ["acme", "a", "t-1", "tenant_2.prod", "0" * 63])
def test_valid_tenant_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../x", "a/b", "Acme", "-x", "_x", ".x", "a b", "0" * 64, "é", "a\n"]
)
def test_invalid_tenant_names_are_rejected(name: str) -> None:
    with pytest.raises(CgroupError, match="invalid tenant name"):
        validate_name(name)


def test_limits_validate_their_fields() -> None:
    with pytest.raises(CgroupError, match="memory_max must be a positive integer"):
        TenantLimits(memory_max=0)
    with pytest.raises(CgroupError, match=r"cpu_max must be a number of cores >= 0\.01"):
        TenantLimits(cpu_max=0.001)
    with pytest.raises(CgroupError, match=r"cpu_weight must be an integer in 1\.\.10000"):
        TenantLimits(cpu_weight=10001)
    with pytest.raises(CgroupError, match="pids_max"):
        TenantLimits(pids_max=True)


def test_limits_parse_config_values_and_describe_themselves() -> None:
    limits = TenantLimits.parse(memory_max="128M", cpu_max="500m", pids_max=64)
    assert limits == TenantLimits(memory_max=128 * MiB, cpu_max=0.5, pids_max=64)
    assert limits.describe() == "memory 128 MiB, cpu 0.5, pids 64"
    assert limits.cpu_quota_us(100_000) == 50_000
    assert TenantLimits().describe() == "unlimited"
    with pytest.raises(ValueError, match="'128Q'"):
        TenantLimits.parse(memory_max="128Q")


def test_every_backend_implements_the_interface(tmp_path: Path) -> None:
    backends: list[object] = [
        NoneBackend(),
        V2Backend(str(tmp_path), "/"),
        V1Backend({c: Hierarchy(c, str(tmp_path / c), "/") for c in ("memory", "cpu", "pids")}),
    ]
    for backend in backends:
        assert isinstance(backend, CgroupBackend), type(backend).__name__


# --------------------------------------------------------------------------- none backend


@pytest.fixture
def children() -> Iterator[Callable[[list[str]], subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_none_backend_contains_nothing_but_accounts_for_placed_processes(
    children: Callable[[list[str]], subprocess.Popen[bytes]],
) -> None:
    backend = NoneBackend(reason="test")
    backend.create("acme", TenantLimits(memory_max=64 * MiB))
    assert backend.procs_files("acme") == []
    shell = children(["sh", "-c", "sleep 60 & wait"])
    backend.place("acme", shell.pid)

    deadline = time.monotonic() + 5
    while len(backend.pids("acme")) < 2:  # sh and the sleep it forks
        assert time.monotonic() < deadline, backend.pids("acme")
        time.sleep(0.005)
    usage = backend.usage("acme")
    assert isinstance(usage, Usage)
    assert usage.pids == 2
    assert usage.memory_current > 0
    assert usage.memory_peak >= usage.memory_current
    assert usage.oom_kills == 0
    assert backend.oom_killed_since("acme", 0) is False

    backend.kill_all("acme")
    assert shell.wait(timeout=10) == -signal.SIGKILL
    assert backend.pids("acme") == []
    backend.remove("acme")
    backend.remove("acme")
    assert backend.tenants() == []
    assert backend.cleanup_stale() == []
