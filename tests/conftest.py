"""Shared fixtures: a real `hourai` process on a free port, and a small HTTP client."""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Timing belongs to the benchmarks: on a shared 2-core machine a slow example is noise, not a
# failure, so property tests run without hypothesis's per-example deadline.
settings.register_profile("hourai", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("hourai")

REPO = Path(__file__).resolve().parents[1]
FUNCTIONS = REPO / "tests" / "functions"
EXAMPLES = REPO / "examples"
_SERVING = re.compile(r"serving .* at (http://[\d.]+:(\d+)/)")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def start(self) -> str | None:
        return self.headers.get("x-hourai-start")

    def json(self) -> object:
        import json

        return json.loads(self.body)


def request(
    port: int,
    path: str = "/",
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


class HouraiProcess:
    """`hourai ARGS` as a child process; its stderr is collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.args = args
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hourai", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=REPO,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0
        self.url = ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """The first log line matching `pattern`; fails the test at the deadline."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no log line matching {pattern!r} within {timeout}s; log:\n"
                        + "\n".join(self.lines[-40:])
                    )
                self._cond.wait(min(remaining, 0.2))

    def wait_serving(self, timeout: float = 60.0) -> HouraiProcess:
        m = self.wait_for(_SERVING.pattern, timeout)
        self.url, self.port = m.group(1), int(m.group(2))
        return self

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode


@pytest.fixture
def hourai_run() -> Iterator:
    """Start `hourai run ...` processes; all are stopped (by pid) after the test."""
    started: list[HouraiProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, wait: bool = True) -> HouraiProcess:
        proc = HouraiProcess(["run", "--port", "0", *args], env=env)
        started.append(proc)
        return proc.wait_serving() if wait else proc

    yield start
    for proc in started:
        proc.stop()


def snapshot_processes(proc: HouraiProcess) -> list:  # type: ignore[type-arg]
    """The snapshot processes of a `hourai run` (psutil): children of its root zygote."""
    import psutil

    root = psutil.Process(proc.proc.pid).children()
    return [s for z in root for s in z.children()]


def worker_processes(proc: HouraiProcess) -> list:  # type: ignore[type-arg]
    """Its live worker processes (psutil): the snapshots' children, zombies left out."""
    return [w for s in snapshot_processes(proc) for w in s.children() if w.status() != "zombie"]


def host_pid(root: int, reply: dict) -> int:  # type: ignore[type-arg]
    """The host's pid of the process that answered ``reply`` (its ``pid`` and ``pidns``, the
    inode of its /proc/self/ns/pid), searched below the hourai process ``root``.

    A root daemon gives each snapshot a pid namespace of its own, where a worker sees itself
    as pid 2 or so; without root there is none and the pid is the host's.
    """
    import psutil

    pid, pidns = reply["pid"], reply.get("pidns")
    if pidns is None or pidns == os.stat("/proc/self/ns/pid").st_ino:
        return int(pid)
    for proc in psutil.Process(root).children(recursive=True):
        try:
            if os.stat(f"/proc/{proc.pid}/ns/pid").st_ino != pidns:
                continue
            with open(f"/proc/{proc.pid}/status") as f:
                nspid = next(line for line in f if line.startswith("NSpid:")).split()[-1]
        except (OSError, StopIteration):
            continue
        if int(nspid) == pid:
            return proc.pid
    raise AssertionError(f"no process below {root} is pid {pid} in pid namespace {pidns}")


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> None:  # type: ignore[no-untyped-def]
    """Poll `predicate` until true; fail at the deadline (never a blind sleep)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


# Which tests ran against a real cgroup hierarchy, said plainly at the end of every run.
_REAL_CGROUP_FILES = ("test_cgroup_v1.py", "test_isolation.py", "test_daemon.py")
_cgroup_outcomes: dict[str, dict[str, int]] = {}


def pytest_runtest_logreport(report) -> None:  # type: ignore[no-untyped-def]
    if report.when != "call" and not (report.when == "setup" and report.skipped):
        return
    name = report.nodeid.split("::")[0].rsplit("/", 1)[-1]
    if not (name.startswith("test_cgroup") or name in _REAL_CGROUP_FILES):
        return
    real = name in _REAL_CGROUP_FILES or "real_kernel" in report.nodeid
    where = "REAL hierarchy" if real else "fake cgroupfs trees and layouts"
    bucket = _cgroup_outcomes.setdefault(f"{name} [{where}]", {})
    bucket[report.outcome] = bucket.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if not _cgroup_outcomes:
        return
    from hourai.cgroup import detect

    tr = terminalreporter
    tr.section("cgroups: what ran against a real hierarchy")
    tr.write_line(f"this host: {detect('auto', subtree='hourai-probe').describe()}")
    for name, counts in sorted(_cgroup_outcomes.items()):
        summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
        tr.write_line(f"  {name}: {summary}")


# ---------------------------------------------------------------------- hourai daemon

_daemon_ids = iter(range(1_000_000))
_DAEMON_SERVING = re.compile(r"serving \d+ functions at (http://[\d.]+:(\d+)/)")


class DaemonProcess(HouraiProcess):
    """`hourai daemon` on a state dir of its own, listening on a free port."""

    def __init__(
        self, state: Path, config: Path, env: dict[str, str] | None = None, wait: bool = True
    ) -> None:
        self.state = state
        self.config = config
        self.socket = state / "control.sock"
        self.subtree = ""
        self.started_at = time.monotonic()
        super().__init__(
            ["daemon", "--config", str(config), "--state-dir", str(state)],
            env=env,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 120.0) -> DaemonProcess:
        m = self.wait_for(_DAEMON_SERVING.pattern, timeout)
        self.url, self.port = m.group(1), int(m.group(2))
        self.wait_for(r"ready in [\d.]+s", timeout)
        self.ready_after = time.monotonic() - self.started_at
        return self

    def cli(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """`hourai ARGS --socket <ours>`, as a user would run it."""
        result = subprocess.run(
            [sys.executable, "-m", "hourai", *args, "--socket", str(self.socket)],
            cwd=REPO,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"hourai {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
            )
        return result

    def cli_json(self, *args: str) -> dict:  # type: ignore[type-arg]
        """`hourai ARGS --json`, parsed."""
        import json

        return json.loads(self.cli(*args, "--json").stdout)

    def get(self, path: str, **kw) -> Reply:  # type: ignore[no-untyped-def]
        return request(self.port, path, **kw)


@pytest.fixture
def daemon_root() -> Path | None:
    """Where ``hourai_daemon`` makes its temp dir (None: the system's temp dir)."""
    return None


@pytest.fixture
def hourai_daemon(daemon_root: Path | None) -> Iterator:
    """Start `hourai daemon` processes: ``start(config_text="", name="state", env=None)``.

    Each test gets a temp dir (not pytest's tmp_path: its parents are 0700, out of reach of
    the tenants' uids) and a cgroup subtree of its own, both removed afterwards; every
    daemon is stopped by pid. ``start.subtree`` and ``start.root`` say where things live.
    """
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="hourai-d-", dir=daemon_root))
    root.chmod(0o711)
    subtree = f"hourai-test-{os.getpid()}-{next(_daemon_ids)}"
    started: list[DaemonProcess] = []

    def start(
        config_text: str = "",
        name: str = "state",
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> DaemonProcess:
        config = root / f"{name}.toml"
        config.write_text(f'listen = ["127.0.0.1:0"]\ncgroup_subtree = "{subtree}"\n' + config_text)
        proc = DaemonProcess(root / name, config, env=env, wait=False)
        proc.subtree = subtree
        started.append(proc)
        return proc.wait_ready() if wait else proc

    start.subtree = subtree  # type: ignore[attr-defined]
    start.root = root  # type: ignore[attr-defined]
    yield start
    for proc in started:
        proc.stop(timeout=30)
    if os.geteuid() == 0:
        from hourai.cgroup import CgroupError, detect

        try:
            detect("auto", subtree=subtree).remove_subtree()
        except CgroupError:
            pass
    shutil.rmtree(root, ignore_errors=True)
