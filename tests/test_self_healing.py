"""What the daemon depends on dies; the daemon heals and says so meanwhile."""

from __future__ import annotations

import os
import signal

import psutil
from conftest import EXAMPLES, wait_until

from hourai.client import Client

HELLO = str(EXAMPLES / "hello" / "handler.py")
NO_SPARES = "[defaults]\nspares = 0\n"


def _root_zygote(pid: int) -> psutil.Process:
    found = []
    for child in psutil.Process(pid).children():
        try:
            if child.status() != "zombie" and "hourai.snapshot.zygote" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # gone, or died between the two reads
            continue
    (zygote,) = found
    return zygote


def test_a_killed_root_zygote_is_restarted_and_functions_serve_again(hourai_daemon) -> None:
    d = hourai_daemon(NO_SPARES)
    client = Client(d.socket)
    d.cli("deploy", "hello", HELLO)
    assert d.get("/hello/").status == 200
    first = _root_zygote(d.proc.pid)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    d.wait_for(r"root zygote died .*restarting it")
    # a new one comes up by itself, and the function is served from a rebuilt snapshot
    wait_until(lambda: client.health()[0] == 200, timeout=20)
    assert _root_zygote(d.proc.pid).pid != first.pid
    reply = d.get("/hello/")
    assert reply.status == 200 and reply.start == "cold"
    # deploys work again too
    assert "deployed" in d.cli("deploy", "again", HELLO).stdout
    assert d.get("/again/").status == 200


def test_a_root_zygote_that_keeps_dying_is_restarted_ever_more_slowly(hourai_daemon) -> None:
    d = hourai_daemon(NO_SPARES)
    client = Client(d.socket)
    for _ in range(5):  # each dies soon after its start: 0.2, 0.4, 0.8, 1.6 s before the next
        zygote = _root_zygote(d.proc.pid)
        os.kill(zygote.pid, signal.SIGKILL)
        wait_until(lambda z=zygote: _root_zygote_or_none(d.proc.pid) not in (None, z.pid), 20)
    zygote = _root_zygote(d.proc.pid)
    os.kill(zygote.pid, signal.SIGKILL)
    wait_until(lambda: _root_zygote_or_none(d.proc.pid) is None, 10)
    # down for seconds now, and /healthz says why
    status, doc = client.health()
    assert status == 503 and any("root zygote is not running" in p for p in doc["problems"])
    wait_until(lambda: client.health()[0] == 200, timeout=30)
    d.cli("deploy", "hello", HELLO)
    assert d.get("/hello/").status == 200


def _root_zygote_or_none(pid: int) -> int | None:
    try:
        return _root_zygote(pid).pid
    except ValueError:
        return None


def test_a_loop_the_runtime_depends_on_is_restarted_when_it_fails() -> None:
    import asyncio
    from types import SimpleNamespace

    from hourai.daemon import Runtime

    runs: list[int] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("policy bug")

    async def main() -> None:
        owner = SimpleNamespace(loop=asyncio.get_running_loop())
        await asyncio.wait_for(Runtime._supervise(owner, flaky, "policy"), 10)  # type: ignore[arg-type]

    asyncio.run(main())
    assert len(runs) == 3  # failed twice, ran again each time, then ended by itself
