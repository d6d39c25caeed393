"""Schedules in a real daemon: ticks become async invocations with EventBridge's payload;
ticks missed while the daemon was down are reported, and only the latest is delivered."""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

from conftest import FUNCTIONS, wait_until

from hourai.client import Client

NO_SPARES = "[defaults]\nspares = 0\n"


def test_missed_ticks_are_reported_and_caught_up_once(hourai_daemon, tmp_path: Path) -> None:
    where = tmp_path / "tick"
    shutil.copytree(FUNCTIONS / "asyncjob", where)
    (where / "hourai.toml").write_text('entry = "handler"\nschedule = "rate(1 minute)"\n')
    d = hourai_daemon(NO_SPARES)
    d.cli("deploy", "tick", str(where))
    assert "schedule: rate(1 minute)" in d.cli("show", "tick").stdout
    assert d.stop() == 0

    # as if the daemon had been down for 5.5 minutes after its last tick
    db = sqlite3.connect(d.state / "invocations.db")
    with db:
        db.execute("UPDATE schedules SET last_tick = ?", (time.time() - 330,))
    db.close()

    again = hourai_daemon(NO_SPARES)
    again.wait_for(r"tick: schedule rate\(1 minute\): 5 ticks missed while hourai was down")
    client = Client(again.socket)
    shown = client.show("tick")
    assert "5 ticks missed" in shown["schedule"]["missed"]
    assert "missed: 5 ticks missed" in again.cli("show", "tick").stdout

    def delivered() -> list[dict]:  # type: ignore[type-arg]
        rows = client.invocations("tick")["invocations"]
        return [r for r in rows if r["source"] == "schedule" and r["status"] == "succeeded"]

    wait_until(lambda: len(delivered()) >= 1, timeout=30)
    assert len(delivered()) == 1  # one catch-up, not five
    event = delivered()[0]["result"]["got"]
    assert event["detail-type"] == "Scheduled Event" and event["source"] == "aws.events"
    assert event["detail"] == {} and event["version"] == "0" and event["resources"]
    assert event["time"].endswith("Z") and len(event["id"]) == 36
