"""Only crashes back off, with real workers: what a client sees after timeouts."""

from __future__ import annotations

from conftest import FUNCTIONS, request

BEHAVE = str(FUNCTIONS / "behave.py")


def test_three_timeouts_then_a_cheap_request_is_served(hourai_run) -> None:
    fn = hourai_run(BEHAVE, "--timeout", "0.5", "--spares", "0")
    for _ in range(3):
        slow = request(fn.port, "/sleep?s=5")
        assert slow.status == 504, slow.body
        assert b"timed out after 0.5s" in slow.body
    cheap = request(fn.port, "/")
    assert cheap.status == 200, cheap.body
    assert cheap.body == b"hello from behave"


def test_a_worker_that_exits_at_its_first_invocation_still_backs_off(hourai_run) -> None:
    fn = hourai_run(BEHAVE, "--spares", "0")
    for _ in range(3):
        assert request(fn.port, "/exit").status == 502
    refused = request(fn.port, "/")
    assert refused.status == 503
    assert b"crash-looping" in refused.body and b"exit" in refused.body
    assert "retry-after" in refused.headers
