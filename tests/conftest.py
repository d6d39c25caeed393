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
