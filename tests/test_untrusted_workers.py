"""Workers are untrusted, and a function's output is the function's: a real daemon against a
function that writes its own frames on its channel, answers too much, prints too much, and
one that times out and dies. What the user sees: the 502 naming what was wrong, a neighbour
tenant that keeps serving, a daemon whose memory stays put and whose own log carries none of
the function's output, and `hourai logs NAME` telling the whole story.

Every test starts its own daemon (the ``hourai_daemon`` fixture) and stops it by pid.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import psutil
import pytest
from conftest import EXAMPLES, FUNCTIONS, DaemonProcess, wait_until

from hourai.client import Client

HELLO = str(EXAMPLES / "hello" / "handler.py")
HOSTILE = str(FUNCTIONS / "hostile_worker.py")
BEHAVE = str(FUNCTIONS / "behave.py")
NO_SPARES = "[defaults]\nspares = 0\n"


def _two_tenants(d: DaemonProcess, *hostile_flags: str) -> None:
    d.cli("deploy", "victim", HELLO, "--tenant", "quiet")
    d.cli("deploy", "hostile", HOSTILE, "--tenant", "loud", *hostile_flags)


def _log(d: DaemonProcess, name: str) -> str:
    return Client(d.socket).logs(name, lines=10_000)["text"]


@contextmanager
def _victim_traffic(d: DaemonProcess) -> Iterator[list[int]]:
    """The victim tenant's requests, one after another, for as long as the block runs."""
    statuses: list[int] = []
    stop = threading.Event()

    def loop() -> None:
        for _ in range(100_000):
            if stop.is_set():
                return
            statuses.append(d.get("/victim/", timeout=30).status)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        wait_until(lambda: len(statuses) >= 3, timeout=30)
        yield statuses
    finally:
        stop.set()
        thread.join(60)


@contextmanager
def _peak_rss(pid: int) -> Iterator[dict[str, int]]:
    proc = psutil.Process(pid)
    seen = {"before": proc.memory_info().rss, "peak": 0}
    stop = threading.Event()

    def watch() -> None:
        for _ in range(1_000_000):
            seen["peak"] = max(seen["peak"], proc.memory_info().rss)
            if stop.wait(0.005):
                return

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(10)
        seen["peak"] = max(seen["peak"], proc.memory_info().rss)


@pytest.mark.parametrize(
    ("path", "violation"),
    [
        ("flood-valid", "answer to request 1000000000, which it was not running"),
        ("flood-junk", "undecodable frame"),
    ],
)
def test_a_worker_flooding_its_channel_is_cut_off_and_the_neighbour_keeps_serving(
    hourai_daemon, path: str, violation: str
) -> None:
    d = hourai_daemon(NO_SPARES)
    _two_tenants(d, "--timeout", "60")
    with _victim_traffic(d) as victim, _peak_rss(d.proc.pid) as rss:
        # the flood would go on for 30 s; the first bad frame ends it
        reply = d.get(f"/hostile/{path}?s=30", timeout=60)
        served = len(victim)
        wait_until(lambda: len(victim) >= served + 20, timeout=30)
    assert reply.status == 502
    assert b"hostile's worker broke the channel protocol" in reply.body
    assert violation.encode() in reply.body
    assert set(victim) == {200}
    assert rss["peak"] - rss["before"] < 64 << 20
    # the function's own log says what the daemon did, and to which worker
    wait_until(lambda: "killed:" in _log(d, "hostile"))
    assert "[hourai] worker " in _log(d, "hostile") and violation in _log(d, "hostile")
    # and the next request gets a fresh worker
    assert d.get("/hostile/").body == b"hostile but quiet"


@pytest.mark.parametrize(
    ("path", "violation"),
    [
        ("bad-status", "res frame: status must be an integer 100..599, got '200'"),
        ("bad-headers", "res frame: headers must be a list, got int"),
        ("missing-body", "res frame: missing headers, body"),
        ("unknown-id", "which it was not running"),
        ("unknown-type", "unexpected 'inv' frame from a worker"),
        ("huge-declared", "response frame of 2.0 GiB is over max_response_size (6 MiB)"),
    ],
)
def test_a_malformed_reply_gets_a_502_naming_it_at_once_not_at_the_timeout(
    hourai_daemon, path: str, violation: str
) -> None:
    d = hourai_daemon(NO_SPARES)
    # The function sleeps 20 s after its bad frame and the timeout is 40 s: a daemon that
    # waited would answer 200 "too late" or 504, never this 502.
    d.cli("deploy", "hostile", HOSTILE, "--timeout", "40")
    reply = d.get(f"/hostile/{path}?s=20", timeout=60)
    assert reply.status == 502, reply.body
    assert violation.encode() in reply.body
    assert reply.start is not None
    wait_until(lambda: violation in _log(d, "hostile"))
    assert "Traceback" not in d.log  # nothing raised inside the daemon
    assert d.get("/hostile/").status == 200


def test_a_response_over_max_response_size_is_refused_without_the_daemon_buffering_it(
    hourai_daemon,
) -> None:
    d = hourai_daemon(NO_SPARES)
    _two_tenants(d, "--max-workers", "6")
    with _victim_traffic(d) as victim, _peak_rss(d.proc.pid) as rss:
        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda _: d.get("/hostile/big?mb=60", timeout=60), range(6)))
        served = len(victim)
        wait_until(lambda: len(victim) >= served + 5, timeout=30)
    for reply in replies:
        assert reply.status == 502
        assert b"function hostile: response frame of 60.0 MiB" in reply.body
        assert b"is over max_response_size (6 MiB); refused unread" in reply.body
    assert set(victim) == {200}
    # six 60 MB answers took the daemon from 36 to 451 MiB before; none of it is read now
    assert rss["peak"] - rss["before"] < 64 << 20, rss
    wait_until(lambda: "over max_response_size" in _log(d, "hostile"))


def test_max_response_size_is_a_function_option(hourai_daemon) -> None:
    d = hourai_daemon(NO_SPARES)
    d.cli("deploy", "hostile", HOSTILE, "--max-response-size", "1M")
    assert d.cli_json("show", "hostile")["limits"]["max_response_size"] == 1 << 20
    small = d.get("/hostile/big?mb=0.5")
    assert small.status == 200 and len(small.body) == 1 << 19
    over = d.get("/hostile/big?mb=1.1")
    assert over.status == 502 and b"over max_response_size (1 MiB)" in over.body
    # the body itself is checked too, not only the frame's length
    d.cli("deploy", "hostile", HOSTILE, "--max-response-size", "300K")
    assert d.get("/hostile/big?mb=0.2").status == 200
    just_over = d.get("/hostile/big?mb=0.3")
    assert just_over.status == 502
    assert b"response of 307.2 KiB is over max_response_size (300 KiB)" in just_over.body


def test_output_is_held_to_a_budget_and_kept_out_of_the_daemons_log(hourai_daemon) -> None:
    d = hourai_daemon(NO_SPARES)
    _two_tenants(d)
    with _victim_traffic(d) as victim:
        assert d.get("/hostile/print?mb=50", timeout=60).body == b"printed"
        assert d.get("/hostile/print-line?mb=20", timeout=60).body == b"printed"
    assert set(victim) == {200}
    wait_until(lambda: "dropped" in _log(d, "hostile"), timeout=20)
    wait_until(lambda: "more of this line cut" in _log(d, "hostile"), timeout=20)
    text = _log(d, "hostile")
    notice = next(line for line in text.splitlines() if "dropped" in line)
    assert "lines (" in notice and "hostile printed more than its output limit" in notice
    cut = next(line for line in text.splitlines() if "more of this line cut" in line)
    assert len(cut) < 20_000 and "(20.0 MiB more of this line cut)" in cut
    kept = sum(p.stat().st_size for p in (d.state / "logs").glob("hostile.log*"))
    assert kept < 8 << 20
    # 50 MB printed became 60 MB of the daemon's log before; now none of it is there
    assert "yyyyyyyy" not in d.log and "zzzzzzzz" not in d.log
    assert len(d.log) < 1 << 20


def test_the_functions_log_tells_of_timeouts_deaths_and_backoff(hourai_daemon) -> None:
    d = hourai_daemon(NO_SPARES)
    d.cli("deploy", "b", BEHAVE, "--timeout", "1")
    assert d.get("/b/sleep?s=5").status == 504
    assert d.get("/b/exit").status == 502
    statuses = [d.get("/b/kill").status for _ in range(5)]
    assert statuses[0] == 502 and 503 in statuses  # killed, then crash-looping
    wait_until(lambda: "backoff:" in _log(d, "b"))
    text = _log(d, "b")
    assert "[hourai] request " in text and "function timed out after 1s" in text
    assert "worker of b exited with status 3" in text
    assert "worker of b killed by SIGKILL" in text
    assert "[hourai] backoff: " in text
    # what a user reads first: the last lines of `hourai logs b`
    assert "backoff" in d.cli("logs", "b").stdout


def test_a_snapshot_that_writes_its_own_frames_is_killed_and_refused(hourai_daemon) -> None:
    """Module-level code runs in the snapshot and can reach its channel to the daemon."""
    d = hourai_daemon("[defaults]\nspares = 0\n")
    d.cli("deploy", "calm", str(FUNCTIONS / "behave.py"))
    refused = d.cli("deploy", "forger", str(FUNCTIONS / "hostile_snapshot.py"), check=False)
    assert refused.returncode != 0
    assert "broke the channel protocol" in refused.stderr and "kind must be" in refused.stderr
    # nothing of it is left (the root zygote has calm's snapshot only), the daemon serves on
    (root_zygote,) = psutil.Process(d.proc.pid).children()
    wait_until(
        lambda: len([p for p in root_zygote.children() if p.status() != "zombie"]) == 1
    )
    assert d.get("/calm/pid").status == 200
