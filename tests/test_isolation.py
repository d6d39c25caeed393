"""Tenant isolation for real: cgroup limits, separate uids, private temp dirs.

(What a hostile tenant tries against these is in test_hostile.py.)

These run against the host's real cgroup hierarchy and need root; elsewhere they skip and
say why.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest
from conftest import FUNCTIONS, host_pid, request, wait_until, worker_processes

from hourai.cgroup import detect

PROBE = str(FUNCTIONS / "tenant_probe.py")


def _real_cgroups() -> str | None:
    if os.geteuid() != 0:
        return "needs root: per-tenant cgroups and uids are only given by a root daemon"
    backend = detect("auto", subtree="hourai-probe")
    if backend.name == "none":
        return f"no usable cgroup hierarchy on this host: {backend.describe()}"
    return None


pytestmark = pytest.mark.skipif(_real_cgroups() is not None, reason=_real_cgroups() or "")


def _cgroup_dirs(pid: int) -> dict[str, Path]:
    """controller -> the cgroup directory of `pid` in each v1 hierarchy we use."""
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            if c in {"memory", "cpu", "pids"}:
                out[c] = Path("/sys/fs/cgroup", c) / path.lstrip("/")
    return out


def test_worker_runs_confined_as_its_tenant(hourai_run) -> None:
    proc = hourai_run(PROBE, "--tenant", "alpha", "--memory", "256M", "--pids", "64")
    me = request(proc.port, "/whoami").json()
    assert me["uid"] != 0 and me["gid"] != 0
    assert me["groups"] == []
    assert me["no_new_privs"] == "1"
    assert me["core"] == [0, 0]
    assert me["nofile"][0] <= 1024
    assert me["sys_path_ok"] == "wave"  # the interpreter's library stays importable
    assert me["idna"] == "xn--bcher-kva.example"  # ... and so do lazily loaded submodules
    # only what the function was given: no daemon variables
    assert "PYTEST_CURRENT_TEST" not in me["env"] and "HOME" in me["env"]
    assert me["tmpdir"] == "/tmp"  # a private tmpfs (test_hostile.py tries it)
    # the worker (and so its snapshot) lives in the tenant's groups
    worker = host_pid(proc.proc.pid, me)
    groups = _cgroup_dirs(worker)
    assert all(str(d).endswith("/alpha") for d in groups.values()), groups
    assert int((groups["memory"] / "memory.limit_in_bytes").read_text()) == 256 << 20
    assert int((groups["pids"] / "pids.max").read_text()) == 64
    snapshot = psutil.Process(worker).parent()
    assert _cgroup_dirs(snapshot.pid) == groups
    assert snapshot.uids().real == me["uid"]


def test_code_is_readable_but_not_writable(hourai_run) -> None:
    proc = hourai_run(PROBE, "--tenant", "alpha")
    assert request(proc.port, "/write-code").json() == {"error": "PermissionError"}


def test_cpu_quota_is_applied(hourai_run) -> None:
    proc = hourai_run(PROBE, "--tenant", "alpha", "--cpu", "0.5")
    pid = host_pid(proc.proc.pid, request(proc.port, "/whoami").json())
    cpu = _cgroup_dirs(pid)["cpu"]
    quota = int((cpu / "cpu.cfs_quota_us").read_text())
    period = int((cpu / "cpu.cfs_period_us").read_text())
    assert quota / period == pytest.approx(0.5)


def test_unbounded_allocation_is_oom_killed_inside_the_tenant(hourai_run) -> None:
    hog = hourai_run(PROBE, "--tenant", "hog", "--memory", "96M", "--spares", "0")
    other = hourai_run(PROBE, "--tenant", "bystander", "--spares", "0")
    reply = request(hog.port, "/alloc")
    assert reply.status == 502
    assert b"OOM" in reply.body and b"96 MiB memory limit" in reply.body
    assert request(other.port, "/whoami").status == 200
    # the tenant's next request is served by a fresh worker; the daemon lived through it
    again = request(hog.port, "/whoami")
    assert again.status == 200 and again.start == "fork"
    assert hog.proc.poll() is None


def test_an_oom_kill_is_named_for_a_spare_forked_to_refill_another(hourai_run) -> None:
    # A refill's fork is sent after the request that used the spare (its OOM mark with it):
    # the second worker is such a refill, and its death is still told apart as an OOM kill.
    hog = hourai_run(PROBE, "--tenant", "hog", "--memory", "96M", "--spares", "1")
    for _ in range(2):
        wait_until(lambda: len(worker_processes(hog)) == 1, timeout=10)  # the spare
        reply = request(hog.port, "/alloc")
        assert reply.status == 502 and reply.start == "spare"
        assert b"OOM" in reply.body and b"96 MiB memory limit" in reply.body
    assert hog.proc.poll() is None


def test_fork_bomb_is_stopped_by_pids_max(hourai_run) -> None:
    bomb = hourai_run(PROBE, "--tenant", "bomb", "--pids", "40", "--timeout", "2", "--spares", "0")
    other = hourai_run(PROBE, "--tenant", "bystander", "--spares", "0")
    pids_dir = _cgroup_dirs(host_pid(bomb.proc.pid, request(bomb.port, "/whoami").json()))["pids"]
    reply = request(bomb.port, "/forkbomb")
    assert reply.status == 504
    assert int((pids_dir / "pids.max").read_text()) == 40
    assert request(other.port, "/whoami").status == 200
    # the bomb's processes died with its worker; the tenant is served again
    wait_until(lambda: int((pids_dir / "pids.current").read_text()) <= 3, timeout=10)
    assert request(bomb.port, "/whoami").status == 200
    assert bomb.proc.poll() is None


def test_tenants_cannot_read_each_others_files_or_signal_each_others_workers(hourai_run):
    a = hourai_run(PROBE, "--tenant", "alpha", "--spares", "0")
    b = hourai_run(PROBE, "--tenant", "beta", "--spares", "0")
    written = request(b.port, "/write?name=s.txt&text=beta-secret").json()["written"]
    b_me = request(b.port, "/whoami").json()
    b_pid = host_pid(b.proc.pid, b_me)
    a_me = request(a.port, "/whoami").json()
    assert a_me["uid"] != b_me["uid"]
    # the same path names a's own private /tmp, where b's file is not
    assert request(a.port, f"/read?path={written}").json() == {"error": "FileNotFoundError"}
    # b's worker is not even there to be named in a's pid namespace
    assert request(a.port, f"/signal?pid={b_pid}").json() == {"error": "ProcessLookupError"}
    assert psutil.pid_exists(b_pid)
    # the owner can read its own file
    assert request(b.port, f"/read?path={written}").json() == {"read": "beta-secret"}
