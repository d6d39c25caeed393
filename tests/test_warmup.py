"""Warm-up requests (``warmup`` / ``--warmup``): served by the snapshot before it forks, so a
framework's lazy first-request work is done once and every worker finds it done; one that
fails, or leaves a thread behind, refuses the deploy and the previous version serves on."""

from __future__ import annotations

import signal
import textwrap
from pathlib import Path

import pytest
from conftest import HouraiProcess, request, wait_until

from hourai.client import Client
from hourai.config import ConfigError, parse_function_options

APP = textwrap.dedent(
    """
    import os
    import threading
    import time

    from flask import Flask

    app = Flask(__name__)
    LAZY = {}  # what a framework makes on its first request, in whichever process serves it

    RAN_IN = []  # every process that ran "/", the warm-up's path

    @app.route("/")
    def index():
        LAZY.setdefault("made_in", os.getpid())
        RAN_IN.append(os.getpid())
        return {"made_in": LAZY["made_in"], "served_by": os.getpid()}

    @app.route("/ran")
    def ran():
        return {"ran_in": RAN_IN, "me": os.getpid()}

    @app.route("/boom")
    def boom():
        raise RuntimeError("no database yet")

    @app.route("/spawn")
    def spawn():
        threading.Thread(target=time.sleep, args=(60,), daemon=True, name="poller").start()
        return "started"
    """
)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    tmp_path.chmod(0o755)  # the tenant's uid reads the code
    (tmp_path / "app.py").write_text(APP)
    return tmp_path


def test_the_snapshot_serves_the_warm_up_once_for_every_worker(hourai_daemon, app_dir) -> None:
    d = hourai_daemon("[defaults]\nspares = 0\nmax_workers = 2\n")
    d.cli("deploy", "primed", f"{app_dir}/app.py", "--warmup", "/")
    d.cli("deploy", "plain", f"{app_dir}/app.py")
    primed = [d.get("/primed/").json() for _ in range(2)]
    plain = d.get("/plain/").json()
    # Without the warm-up the worker made it in its first request; with it, the snapshot
    # did, before forking: the worker only reads it.
    assert plain["made_in"] == plain["served_by"]
    for doc in primed:
        assert doc["made_in"] != doc["served_by"], doc
    assert primed[0]["made_in"] == primed[1]["made_in"]
    assert "1 warm-up requests served" in d.cli("logs", "primed").stdout
    # a restart restores the function with its warm-up
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0
    again = hourai_daemon("[defaults]\nspares = 0\nmax_workers = 2\n")
    doc = again.get("/primed/").json()
    assert doc["made_in"] != doc["served_by"], doc


def test_a_spare_serves_the_warm_up_again_in_itself_and_a_fork_for_a_request_does_not(
    hourai_daemon, app_dir
) -> None:
    d = hourai_daemon("[defaults]\nmax_workers = 2\nkeep_alive = 60\n")
    d.cli("deploy", "spared", f"{app_dir}/app.py", "--warmup", "/", "--spares", "1")
    d.cli("deploy", "forked", f"{app_dir}/app.py", "--warmup", "/", "--spares", "0")
    client = Client(d.socket)
    wait_until(lambda: client.stats()["functions"]["spared"]["workers"]["spare"] == 1)
    spare = d.get("/spared/ran")
    assert spare.start == "spare"
    doc = spare.json()
    # the snapshot's run, then the spare's own, before this request reached it
    assert len(doc["ran_in"]) == 2 and doc["ran_in"][1] == doc["me"], doc
    fork = d.get("/forked/ran")
    assert fork.start == "fork"
    doc = fork.json()
    assert doc["me"] not in doc["ran_in"] and len(doc["ran_in"]) == 1, doc


def test_hourai_run_takes_warmup_too(app_dir: Path) -> None:
    proc = HouraiProcess(
        ["run", "--port", "0", "--spares", "0", "--warmup", "GET /", f"{app_dir}/app.py"]
    )
    try:
        proc.wait_serving()
        doc = request(proc.port, "/").json()
        assert doc["made_in"] != doc["served_by"], doc
    finally:
        proc.stop()


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/boom", "warm-up request '/boom' answered 500 (see the function's log)"),
        ("/spawn", "the warm-up requests left 1 thread(s) running (poller)"),
    ],
)
def test_a_warm_up_that_fails_refuses_the_deploy_and_the_old_version_serves_on(
    hourai_daemon, app_dir: Path, path: str, reason: str
) -> None:
    d = hourai_daemon("[defaults]\nspares = 0\n")
    d.cli("deploy", "shop", f"{app_dir}/app.py")
    bad = d.cli("deploy", "shop", f"{app_dir}/app.py", "--warmup", path, check=False)
    assert bad.returncode != 0
    assert reason in bad.stderr, bad.stderr
    reply = d.get("/shop/")
    assert reply.status == 200 and reply.json()["made_in"] == reply.json()["served_by"]
    if path == "/boom":
        assert "RuntimeError: no database yet" in d.cli("logs", "shop").stdout


def test_a_handler_that_raises_in_its_warm_up_says_what_it_raised(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    (tmp_path / "handler.py").write_text(
        "def handler(event, context):\n    raise KeyError('tables')\n"
    )
    proc = HouraiProcess(["run", "--port", "0", "--warmup", "/", f"{tmp_path}/handler.py"])
    try:
        proc.wait_for(r"warm-up request '/' raised KeyError: 'tables'")
    finally:
        proc.stop()


@pytest.mark.parametrize(
    "value",
    ["/", ["status"], ["get /"], ["/"] * 9, [1]],
)
def test_warm_up_requests_are_checked(value: object) -> None:
    with pytest.raises(ConfigError, match="warmup"):
        parse_function_options({"warmup": value}, "hourai.toml")
    assert parse_function_options({"warmup": ["/", "POST /render?x=1"]}, "hourai.toml") == {
        "warmup": ("/", "POST /render?x=1")
    }
