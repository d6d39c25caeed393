"""The v1 backend against the real cgroup v1 hierarchies of this host, as root.

Every test works in a subtree named after this test session (``hourai-test-<pid>``) below
this process's own cgroup in each hierarchy, removed by the session fixture even when tests
fail. Child processes are real; each one is killed by pid when its test ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hourai.cgroup import CgroupError, TenantLimits, detect
from hourai.cgroup.v1 import V1Backend

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
SUBTREE = f"hourai-test-{os.getpid()}"


def _v1_or_skip(subtree: str) -> V1Backend:
    if os.geteuid() != 0:
        pytest.skip(f"needs root to create cgroups (running as uid {os.geteuid()})")
    try:
        backend = detect("v1", subtree=subtree)
    except CgroupError as exc:
        pytest.skip(f"cgroup v1 is not usable on this host: {exc}")
    assert isinstance(backend, V1Backend)
    return backend


@pytest.fixture(scope="module")
def backend() -> Iterator[V1Backend]:
    b = _v1_or_skip(SUBTREE)
    try:
        yield b
    finally:
        b.remove_subtree()
    for base in b._base_dirs():
        assert not os.path.exists(base), f"subtree left behind: {base}"


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start a Python child that waits for a line on stdin before running ``body``."""
    started: list[subprocess.Popen[str]] = []

    def start(body: str) -> subprocess.Popen[str]:
        script = "import sys\nsys.stdin.readline()\n" + textwrap.dedent(body)
        proc = subprocess.Popen(
            [sys.executable, "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout):
            if stream:
                stream.close()


def go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


def read_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def group_file(backend: V1Backend, controller: str, tenant: str, name: str) -> str:
    h = backend.hierarchies[controller]
    return Path(h.own_dir, backend.subtree, tenant, name).read_text().strip()


def cgroup_lines(pid: int) -> dict[str, str]:
    """/proc/<pid>/cgroup as {controller: path}."""
    result = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _hid, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            result[c] = path
    return result


def tenant_path(backend: V1Backend, controller: str, tenant: str) -> str:
    own = backend.hierarchies[controller].own.rstrip("/")
    return f"{own}/{backend.subtree}/{tenant}"


# --------------------------------------------------------------------------- limits


def test_create_writes_the_limits_to_the_kernel(backend: V1Backend) -> None:
    limits = TenantLimits(
        memory_max=64 * MiB, memory_high=48 * MiB, cpu_max=0.5, cpu_weight=200, pids_max=20
    )
    backend.create("limits", limits)

    assert group_file(backend, "memory", "limits", "memory.limit_in_bytes") == str(64 * MiB)
    assert group_file(backend, "memory", "limits", "memory.soft_limit_in_bytes") == str(48 * MiB)
    memory_dir = Path(backend.hierarchies["memory"].own_dir, SUBTREE, "limits")
    if (memory_dir / "memory.memsw.limit_in_bytes").exists():
        assert group_file(backend, "memory", "limits", "memory.memsw.limit_in_bytes") == str(
            64 * MiB
        )
    assert group_file(backend, "cpu", "limits", "cpu.cfs_quota_us") == "50000"
    assert group_file(backend, "cpu", "limits", "cpu.cfs_period_us") == "100000"
    assert group_file(backend, "cpu", "limits", "cpu.shares") == str(200 * 1024 // 100)
    assert group_file(backend, "pids", "limits", "pids.max") == "20"
    assert "limits" in backend.tenants()


def test_limits_can_grow_shrink_and_be_lifted(backend: V1Backend) -> None:
    # memsw must stay >= the memory limit at every step; both directions must work.
    backend.create("resize", TenantLimits(memory_max=64 * MiB))
    backend.create("resize", TenantLimits(memory_max=256 * MiB, pids_max=5))  # idempotent
    assert group_file(backend, "memory", "resize", "memory.limit_in_bytes") == str(256 * MiB)
    backend.set_limits("resize", TenantLimits(memory_max=32 * MiB))
    assert group_file(backend, "memory", "resize", "memory.limit_in_bytes") == str(32 * MiB)
    assert group_file(backend, "pids", "resize", "pids.max") == "max"

    backend.set_limits("resize", TenantLimits())
    assert int(group_file(backend, "memory", "resize", "memory.limit_in_bytes")) > 1 << 60
    assert group_file(backend, "cpu", "resize", "cpu.cfs_quota_us") == "-1"
    assert group_file(backend, "cpu", "resize", "cpu.shares") == "1024"
    assert group_file(backend, "pids", "resize", "pids.max") == "max"


def test_operations_on_a_missing_tenant_say_so(backend: V1Backend) -> None:
    with pytest.raises(CgroupError, match="create"):
        backend.usage("never-created")
    with pytest.raises(CgroupError, match="create"):
        backend.place("never-created", os.getpid())
    with pytest.raises(CgroupError, match="invalid tenant name"):
        backend.create("../escape", TenantLimits())


# --------------------------------------------------------------------------- membership


def test_placed_process_is_in_the_group_in_every_hierarchy(backend: V1Backend, spawn) -> None:
    backend.create("place", TenantLimits(memory_max=64 * MiB))
    child = spawn("data = b'x' * (16 << 20)\nprint('ready', flush=True)\nsys.stdin.readline()")
    backend.place("place", child.pid)

    assert backend.pids("place") == [child.pid]
    lines = cgroup_lines(child.pid)
    for controller in backend.hierarchies:
        assert lines[controller] == tenant_path(backend, controller, "place"), controller

    go(child)  # allocate 16 MiB now that the pages are charged to the group
    assert read_line(child) == "ready"
    usage = backend.usage("place")
    assert usage.pids == 1
    assert usage.memory_current >= 16 * MiB
    assert usage.memory_peak >= usage.memory_current
    assert usage.cpu_usec > 0


def test_placing_a_dead_pid_fails_clearly(backend: V1Backend) -> None:
    backend.create("deadpid", TenantLimits())
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(CgroupError, match=f"pid {proc.pid}.*no such process"):
        backend.place("deadpid", proc.pid)


def test_join_moves_the_calling_process(backend: V1Backend) -> None:
    backend.create("join", TenantLimits(pids_max=10))
    script = textwrap.dedent(
        f"""
        from hourai.cgroup import detect
        detect("v1", subtree={SUBTREE!r}).join("join")
        print(open("/proc/self/cgroup").read(), end="")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    lines = {}
    for line in out.stdout.splitlines():
        _hid, controllers, path = line.split(":", 2)
        lines.update(dict.fromkeys(controllers.split(","), path))
    for controller in backend.hierarchies:
        assert lines[controller] == tenant_path(backend, controller, "join"), controller


def test_procs_files_let_a_spawned_child_join_without_the_backend(backend: V1Backend) -> None:
    backend.create("procsfiles", TenantLimits())
    files = backend.procs_files("procsfiles")
    assert len(files) == len({os.path.dirname(f) for f in files}) >= 3
    script = "import os,sys\nfor p in sys.argv[1:]: open(p,'w').write(str(os.getpid()))\n"
    script += "print(open('/proc/self/cgroup').read(), end='')"
    out = subprocess.run(
        [sys.executable, "-c", script, *files], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert f"memory:{tenant_path(backend, 'memory', 'procsfiles')}" in out.stdout


# --------------------------------------------------------------------------- enforcement


def test_memory_hog_is_oom_killed_and_reported(backend: V1Backend, spawn) -> None:
    backend.create("oom", TenantLimits(memory_max=64 * MiB))
    mark = backend.oom_kill_count("oom")
    hog = spawn("data = b'x' * (200 << 20)\nprint('survived', flush=True)")
    backend.place("oom", hog.pid)
    go(hog)

    assert hog.wait(timeout=30) == -signal.SIGKILL
    assert read_line(hog) == ""
    assert backend.oom_killed_since("oom", mark)
    usage = backend.usage("oom")
    assert usage.oom_kills >= mark + 1
    assert 32 * MiB <= usage.memory_peak <= 64 * MiB


def test_a_plain_sigkill_is_not_mistaken_for_an_oom_kill(backend: V1Backend, spawn) -> None:
    backend.create("notoom", TenantLimits(memory_max=64 * MiB))
    mark = backend.oom_kill_count("notoom")
    child = spawn("")
    backend.place("notoom", child.pid)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=10) == -signal.SIGKILL
    assert not backend.oom_killed_since("notoom", mark)


def test_fork_bomb_is_stopped_by_pids_max(backend: V1Backend, spawn) -> None:
    backend.create("forkbomb", TenantLimits(pids_max=20))
    bomb = spawn(
        """
        import os, signal, time
        forked, error = 0, None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                pid = os.fork()
            except OSError as exc:
                error = exc.errno
                break
            if pid == 0:
                signal.pause()
                os._exit(0)
            forked += 1
        print(forked, error, flush=True)
        signal.pause()
        """
    )
    backend.place("forkbomb", bomb.pid)
    go(bomb)
    forked, error = read_line(bomb).split()

    assert error == "11", "fork should have failed with EAGAIN"
    assert int(forked) == 19  # the bomb itself is the 20th
    assert len(backend.pids("forkbomb")) == 20
    assert backend.usage("forkbomb").pids == 20
    assert group_file(backend, "pids", "forkbomb", "pids.events") == "max 1"

    backend.kill_all("forkbomb")
    assert backend.pids("forkbomb") == []
    assert bomb.wait(timeout=10) == -signal.SIGKILL


def test_cpu_max_throttles_a_busy_loop(backend: V1Backend, spawn) -> None:
    backend.create("cpu", TenantLimits(cpu_max=0.5))
    spinner = spawn(
        """
        import time
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            pass
        print(time.process_time(), flush=True)
        """
    )
    backend.place("cpu", spinner.pid)
    go(spinner)
    cpu_seconds = float(read_line(spinner))
    spinner.wait(timeout=10)

    # 1 s of wall time at 0.5 cores: about 0.5 s of CPU, plus at most a period of slack.
    assert cpu_seconds <= 0.65
    assert backend.usage("cpu").cpu_usec >= cpu_seconds * 0.9 * 1_000_000


# --------------------------------------------------------------------------- teardown


def test_kill_all_empties_the_group_including_grandchildren(backend: V1Backend) -> None:
    backend.create("killall", TenantLimits(pids_max=50))
    shell = subprocess.Popen(
        ["sh", "-c", "read x; sleep 60 & sleep 60 & wait"], stdin=subprocess.PIPE
    )
    try:
        backend.place("killall", shell.pid)
        assert shell.stdin is not None
        shell.stdin.write(b"go\n")
        shell.stdin.flush()
        wait_for(lambda: len(backend.pids("killall")) == 3, "sh and its two sleeps")

        backend.kill_all("killall")
        assert backend.pids("killall") == []
        assert shell.wait(timeout=10) == -signal.SIGKILL
        backend.kill_all("killall")  # nothing left: returns at once
    finally:
        if shell.poll() is None:
            os.kill(shell.pid, signal.SIGKILL)
        shell.wait(timeout=10)
        assert shell.stdin is not None
        shell.stdin.close()


def test_kill_all_refuses_to_kill_the_caller(backend: V1Backend) -> None:
    backend.create("self", TenantLimits())
    own = cgroup_lines(os.getpid())
    backend.join("self")
    try:
        with pytest.raises(CgroupError, match="refusing to kill the calling process"):
            backend.kill_all("self")
    finally:
        # back where this process came from, so the group can go
        for controller, h in backend.hierarchies.items():
            directory = os.path.join(h.mount, own[controller].lstrip("/"))
            Path(directory, "cgroup.procs").write_text(str(os.getpid()))
    assert backend.pids("self") == []


def test_remove_kills_what_is_left_and_is_idempotent(backend: V1Backend, spawn) -> None:
    backend.create("remove", TenantLimits(memory_max=64 * MiB))
    child = spawn("")
    backend.place("remove", child.pid)

    backend.remove("remove")
    assert child.wait(timeout=10) == -signal.SIGKILL
    for controller, h in backend.hierarchies.items():
        assert not Path(h.own_dir, SUBTREE, "remove").exists(), controller
    assert "remove" not in backend.tenants()
    backend.remove("remove")
    with pytest.raises(CgroupError, match="create"):
        backend.place("remove", os.getpid())


def test_cleanup_stale_removes_groups_a_previous_run_left(spawn) -> None:
    subtree = f"{SUBTREE}-stale"
    crashed = _v1_or_skip(subtree)
    try:
        crashed.create("ghost-a", TenantLimits(pids_max=5))
        crashed.create("ghost-b", TenantLimits())
        orphan = spawn("")
        crashed.place("ghost-a", orphan.pid)
        del crashed  # the daemon "crashed" and forgot its groups

        restarted = _v1_or_skip(subtree)
        assert restarted.tenants() == ["ghost-a", "ghost-b"]
        assert restarted.cleanup_stale() == ["ghost-a", "ghost-b"]
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert restarted.tenants() == []
        assert restarted.cleanup_stale() == []
    finally:
        _v1_or_skip(subtree).remove_subtree()
