"""`hourai daemon` and its CLI, for real: a daemon process, its unix socket, its registry."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import pytest
from conftest import EXAMPLES, FUNCTIONS, REPO, HouraiProcess, request, wait_until

_ids = itertools.count()
PROBE = str(FUNCTIONS / "tenant_probe.py")
BEHAVE = str(FUNCTIONS / "behave.py")


class Daemon:
    def __init__(self, state: Path, subtree: str, env: dict[str, str] | None = None) -> None:
        self.state = state
        self.socket = state / "control.sock"
        config = state.parent / f"{state.name}.toml"
        config.write_text(f'listen = ["127.0.0.1:0"]\ncgroup_subtree = "{subtree}"\n')
        self.proc = HouraiProcess(
            ["daemon", "--config", str(config), "--state-dir", str(state)], env=env
        )
        m = self.proc.wait_for(r"daemon serving \d+ functions at http://127\.0\.0\.1:(\d+)/", 60)
        self.port = int(m.group(1))

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "hourai", *args, "--socket", str(self.socket)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"hourai {' '.join(args)} failed:\n{result.stderr}")
        return result

    def get(self, path: str):  # type: ignore[no-untyped-def]
        return request(self.port, path)


@pytest.fixture
def daemons():  # type: ignore[no-untyped-def]
    # Not pytest's tmp_path: its parents are 0700, out of reach of the tenants' uids.
    tmp_path = Path(tempfile.mkdtemp(prefix="hourai-test-"))
    tmp_path.chmod(0o711)
    started: list[Daemon] = []
    subtree = f"hourai-test-{os.getpid()}-{next(_ids)}"

    def start(name: str = "state", **kw) -> Daemon:  # type: ignore[no-untyped-def]
        d = Daemon(tmp_path / name, subtree, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.proc.stop()
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_deploy_invoke_list_show_remove_through_the_cli(daemons) -> None:
    d = daemons()
    out = d.cli("deploy", "hello", str(EXAMPLES / "hello" / "handler.py")).stdout
    assert "deployed hello version" in out and "handler" in out
    assert d.get("/hello/x?name=Ada").json()["message"] == "Hello, Ada!"
    invoked = json.loads(d.cli("invoke", "hello", "--json").stdout)
    assert invoked["status"] == 200
    listed = json.loads(d.cli("ls", "--json").stdout)["functions"]
    assert [f["name"] for f in listed] == ["hello"]
    shown = json.loads(d.cli("show", "hello", "--json").stdout)
    assert shown["active"] == listed[0]["version"]
    assert "windows" in shown["policy"]  # the learned keep-alive is visible
    d.cli("rm", "hello")
    assert d.get("/hello/x").status == 404
    missing = d.cli("show", "hello", check=False)
    assert missing.returncode == 1 and "no function named 'hello'" in missing.stderr


def test_a_bad_version_is_refused_and_the_old_one_keeps_serving(daemons, tmp_path) -> None:
    d = daemons()
    fn = tmp_path / "fn"
    fn.mkdir()
    (fn / "handler.py").write_text("def handler(event, context):\n    return 'v1'\n")
    d.cli("deploy", "app", str(fn))
    (fn / "handler.py").write_text("def handler(event, context)\n    return 'v2'\n")
    refused = d.cli("deploy", "app", str(fn), check=False)
    assert refused.returncode == 1
    assert "refused" in refused.stderr and "SyntaxError" in refused.stderr
    assert d.get("/app/").body == b"v1"
    # a good v2, then roll back to v1
    (fn / "handler.py").write_text("def handler(event, context):\n    return 'v2'\n")
    d.cli("deploy", "app", str(fn))
    assert d.get("/app/").body == b"v2"
    d.cli("rollback", "app")
    assert d.get("/app/").body == b"v1"


def test_kill_9_then_restart_loses_no_function_and_leaves_no_process(daemons) -> None:
    d = daemons()
    d.cli("deploy", "hello", str(EXAMPLES / "hello" / "handler.py"))
    d.cli("deploy", "probe", PROBE, "--tenant", "alpha", "--memory", "128M")
    assert d.get("/probe/whoami").status == 200
    tree = psutil.Process(d.proc.proc.pid).children(recursive=True)
    assert len(tree) >= 4  # root zygote, two snapshots, workers
    probe_cgroup = (
        next(
            line.split(":", 2)[2]
            for line in Path(f"/proc/{d.get('/probe/whoami').json()['pid']}/cgroup")
            .read_text()
            .splitlines()
            if ":memory:" in line
        )
        if os.geteuid() == 0
        else None
    )
    d.proc.proc.send_signal(signal.SIGKILL)
    d.proc.proc.wait(10)
    _gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, f"survived the daemon: {alive}"
    again = daemons()  # same state dir, same cgroup subtree
    assert again.get("/hello/").status == 200
    assert again.get("/probe/whoami").status == 200
    if probe_cgroup is not None:
        # the new run made its groups afresh: the old group was cleaned up and recreated
        assert "removed cgroups left by an earlier run" in again.proc.log


def test_sigterm_drains_in_flight_requests_then_exits(daemons) -> None:
    d = daemons()
    d.cli("deploy", "slow", BEHAVE)
    result: dict[str, object] = {}
    t = threading.Thread(target=lambda: result.update(r=d.get("/slow/sleep?s=1.5")))
    t.start()
    d.proc.wait_for(r"slow", 10)
    wait_until(lambda: "busy" in json.dumps(json.loads(d.cli("stats", "--json").stdout)))
    d.proc.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert result["r"].status == 200  # type: ignore[attr-defined]
    assert d.proc.proc.wait(30) == 0


def test_systemd_notify_messages(daemons, tmp_path) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(60)
    try:
        d = daemons(env={"NOTIFY_SOCKET": path})
        messages = []
        while not any("READY=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        d.proc.proc.send_signal(signal.SIGTERM)
        while not any("STOPPING=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        assert any(m.startswith("STATUS=") for m in messages)
    finally:
        sock.close()


def test_metrics_and_healthz_on_the_control_socket(daemons) -> None:
    from hourai.client import Client

    d = daemons()
    d.cli("deploy", "hello", str(EXAMPLES / "hello" / "handler.py"))
    d.get("/hello/")
    client = Client(d.socket)
    assert client.call("GET", "/healthz")["ok"] is True
    status, text = client.raw("GET", "/metrics")
    body = text.decode()
    assert status == 200
    assert 'hourai_requests_total{function="hello"' in body
    assert "hourai_request_seconds_bucket" in body and "hourai_workers" in body
    # nothing in a bad request can crash the daemon
    assert client.raw("POST", "/functions", {"oops": 1})[0] == 400
    assert client.raw("GET", "/nope")[0] == 404
    assert client.call("GET", "/healthz")["ok"] is True


@pytest.mark.skipif(os.geteuid() != 0, reason="per-tenant uids need a root daemon")
def test_two_tenants_in_one_daemon_are_separated(daemons) -> None:
    d = daemons()
    d.cli("deploy", "a", PROBE, "--tenant", "alpha")
    d.cli("deploy", "b", PROBE, "--tenant", "beta")
    a, b = d.get("/a/whoami").json(), d.get("/b/whoami").json()
    assert a["uid"] != b["uid"]
    secret = d.get("/b/write?name=s.txt&text=beta-only").json()["written"]
    assert d.get(f"/a/read?path={secret}").json() == {"error": "PermissionError"}
    assert d.get(f"/a/signal?pid={b['pid']}").json() == {"error": "PermissionError"}


def test_many_functions_deploy_and_list(daemons, tmp_path) -> None:
    d = daemons()
    for i in range(40):
        fn = tmp_path / f"f{i}"
        fn.mkdir()
        (fn / "handler.py").write_text(f"def handler(e, c):\n    return {i}\n")
        (fn / "hourai.toml").write_text("tenant = 'many'\n")
        d.cli("deploy", f"f{i}", str(fn))
    listed = json.loads(d.cli("ls", "--json").stdout)["functions"]
    assert len(listed) == 40 and {f["tenant"] for f in listed} == {"many"}
    assert d.get("/f39/").body == b"39"


def test_no_daemon_is_a_clear_error(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hourai", "ls", "--socket", str(tmp_path / "none.sock")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3
    assert "no hourai daemon" in result.stderr and "hourai daemon" in result.stderr
