"""`hourai daemon` for real: daemon processes, the CLI, the control socket, systemd's socket.

Every test starts its own daemon on a temp state dir and a cgroup subtree of its own (the
``hourai_daemon`` fixture) and stops it by pid.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from conftest import EXAMPLES, FUNCTIONS, REPO, host_pid, wait_until

from hourai.cgroup import detect
from hourai.client import ApiFailure, Client

HELLO = str(EXAMPLES / "hello" / "handler.py")
BEHAVE = str(FUNCTIONS / "behave.py")
PROBE = str(FUNCTIONS / "tenant_probe.py")
NO_SPARES = "[defaults]\nspares = 0\n"


def _real_cgroups() -> str | None:
    if os.geteuid() != 0:
        return "needs root: per-tenant cgroups and uids are only given by a root daemon"
    backend = detect("auto", subtree="hourai-probe")
    if backend.name == "none":
        return f"no usable cgroup hierarchy on this host: {backend.describe()}"
    return None


needs_cgroups = pytest.mark.skipif(_real_cgroups() is not None, reason=_real_cgroups() or "")


def _write_function(where: Path, body: str) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    (where / "handler.py").write_text(body)
    return where


def test_deploy_invoke_list_show_logs_remove_through_the_cli(hourai_daemon, tmp_path) -> None:
    d = hourai_daemon(NO_SPARES)
    out = d.cli("deploy", "hello", HELLO).stdout
    assert "deployed hello version" in out and "handler 'handler'" in out
    assert d.get("/hello/x?name=Ada").json()["message"] == "Hello, Ada!"

    invoked = json.loads(d.cli("invoke", "hello", "--path", "/x", "--json").stdout)
    assert invoked["status"] == 200 and json.loads(invoked["body"])["path"] == "/x"
    assert invoked["start"] in {"warm", "fork"}
    plain = d.cli("invoke", "hello", "--data", '{"a": 1}').stdout
    assert json.loads(plain)["message"] == "Hello, world!"

    listed = json.loads(d.cli("ls", "--json").stdout)["functions"]
    assert [(f["name"], f["state"], f["kind"]) for f in listed] == [("hello", "serving", "handler")]
    table = d.cli("ls").stdout.splitlines()
    assert table[0].split()[:2] == ["NAME", "VERSION"] and table[1].startswith("hello ")

    shown = json.loads(d.cli("show", "hello", "--json").stdout)
    assert shown["active"] == listed[0]["version"]
    assert shown["versions"][0]["status"] == "ok" and shown["limits"]["spares"] == 0
    assert "hello: serving, version" in d.cli("show", "hello").stdout

    # what a function prints lands in its own log, tagged with the process
    d.cli("deploy", "b", BEHAVE)
    assert d.get("/b/print?msg=hi").status == 200
    api = Client(d.socket)
    wait_until(lambda: "err: hi" in api.logs("b")["text"])
    logs = d.cli("logs", "b").stdout
    assert "out: hi" in logs and "[b#" in logs and "[hourai] deploying version" in logs

    # a body from stdin, and a whole API Gateway event as a Lambda test event is written
    echoed = json.loads(d.cli("invoke", "b", "-", "--path", "/echo", input="from stdin").stdout)
    assert echoed == {"method": "POST", "path": "/echo", "query": "", "body": "from stdin"}
    event = {
        "version": "2.0",
        "rawPath": "/echo",
        "rawQueryString": "q=1",
        "requestContext": {"http": {"method": "PUT"}},
        "body": "evt",
    }
    (tmp_path / "event.json").write_text(json.dumps(event))
    # --event is a direct invocation: the handler gets the event as written, and what it
    # returns is the payload (here a proxy response, as API Gateway would get it)
    echoed = json.loads(d.cli("invoke", "b", "--event", str(tmp_path / "event.json")).stdout)
    assert echoed["statusCode"] == 201
    assert json.loads(echoed["body"]) == {
        "method": "PUT",
        "path": "/echo",
        "query": "q=1",
        "body": "evt",
    }
    failed = d.cli("invoke", "b", "--path", "/raise", check=False)
    assert failed.returncode == 1 and "b answered 500" in failed.stderr

    # logs -f follows what comes next: once it has shown the last line, print another
    assert d.get("/b/print?msg=before").status == 200
    wait_until(lambda: api.logs("b", lines=1)["text"].rstrip().endswith("err: before"))
    follow = subprocess.Popen(
        [sys.executable, "-m", "hourai", "logs", "b", "-f", "-n", "1", "--socket", str(d.socket)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        seen: list[str] = []
        assert follow.stdout is not None
        reader = threading.Thread(target=lambda: seen.extend(follow.stdout), daemon=True)  # type: ignore[arg-type]
        reader.start()
        wait_until(lambda: any("err: before" in line for line in seen), timeout=10)
        assert d.get("/b/print?msg=followed").status == 200
        wait_until(lambda: any("err: followed" in line for line in seen), timeout=10)
    finally:
        follow.terminate()
        follow.wait(10)

    stats = api.stats()
    assert stats["functions"]["hello"]["requests"] >= 2
    assert stats["functions"]["hello"]["starts"]["fork"] >= 1
    assert "default" in stats["tenants"]
    assert "FUNCTION" in d.cli("stats").stdout

    assert "removed hello" in d.cli("rm", "hello").stdout
    assert d.get("/hello/x").status == 404
    missing = d.cli("show", "hello", check=False)
    assert missing.returncode == 1 and "no function named 'hello'" in missing.stderr
    assert [f["name"] for f in api.functions()["functions"]] == ["b"]


def test_a_refused_version_keeps_the_old_one_serving_and_rollback(hourai_daemon, tmp_path) -> None:
    d = hourai_daemon("deploy_timeout = 1.5\n" + NO_SPARES)
    fn = _write_function(tmp_path / "app", "def handler(event, context):\n    return 'v1'\n")
    v1 = json.loads(d.cli("deploy", "app", str(fn), "--json").stdout)["version"]
    (fn / "handler.py").write_text("def handler(event, context)\n    return 'v2'\n")
    refused = d.cli("deploy", "app", str(fn), check=False)
    assert refused.returncode == 1
    assert "refused" in refused.stderr and "SyntaxError" in refused.stderr
    assert f"version {v1} keeps serving" in refused.stderr
    assert d.get("/app/").body == b"v1"
    assert "SyntaxError" in d.cli("logs", "app").stdout  # the traceback, in the function's log

    (fn / "handler.py").write_text("def handler(event, context):\n    return 'v2'\n")
    v2 = json.loads(d.cli("deploy", "app", str(fn), "--json").stdout)["version"]
    assert d.get("/app/").body == b"v2"
    statuses = [(v["version"] == v2, v["status"]) for v in Client(d.socket).show("app")["versions"]]
    assert statuses == [(True, "ok"), (False, "refused"), (False, "ok")]

    assert f"now serving version {v1}" in d.cli("rollback", "app").stdout
    assert d.get("/app/").body == b"v1"
    d.cli("rollback", "app", v2)
    assert d.get("/app/").body == b"v2"
    refused_id = next(v["version"] for v in Client(d.socket).show("app")["versions"] if v["error"])
    again = d.cli("rollback", "app", refused_id, check=False)
    assert again.returncode == 1 and "was refused" in again.stderr
    unknown = d.cli("rollback", "app", "0123456789ab", check=False)
    assert unknown.returncode == 1 and "has no version" in unknown.stderr

    # module-level code that never finishes: refused at deploy_timeout, its snapshot killed
    zygote = next(
        p for p in psutil.Process(d.proc.pid).children() if "zygote" in " ".join(p.cmdline())
    )
    snapshots = {p.pid for p in zygote.children()}
    (fn / "handler.py").write_text("import time\ntime.sleep(600)\ndef handler(e, c):\n    pass\n")
    hung = d.cli("deploy", "app", str(fn), check=False)
    assert hung.returncode == 1 and "not ready within deploy_timeout (1.5s)" in hung.stderr
    assert d.get("/app/").body == b"v2"
    wait_until(lambda: {p.pid for p in zygote.children()} == snapshots)


def test_hourai_toml_beside_the_code_and_flags_over_it(hourai_daemon, tmp_path) -> None:
    d = hourai_daemon(NO_SPARES)
    fn = _write_function(
        tmp_path / "envfn",
        "import os\ndef handler(event, context):\n    return {k: os.environ.get(k) for k in "
        "('GREETING', 'TARGET')}\n",
    )
    (fn / "hourai.toml").write_text(
        'tenant = "tomlten"\ntimeout = 3\nmin_warm = 1\n[env]\nGREETING = "hi"\nTARGET = "toml"\n'
    )
    (tmp_path / "extra.env").write_text("TARGET=file\n")
    d.cli("deploy", "envfn", str(fn), "--timeout", "4", "--env-file", str(tmp_path / "extra.env"))
    shown = Client(d.socket).show("envfn")
    assert shown["tenant"] == "tomlten"
    assert shown["limits"]["timeout"] == 4.0  # the flag wins over hourai.toml
    assert shown["min_warm"] == 1 and shown["limits"]["spares"] == 1
    assert d.get("/envfn/").json() == {"GREETING": "hi", "TARGET": "file"}

    (fn / "hourai.toml").write_text("timeout = -1\n")
    bad = d.cli("deploy", "envfn", str(fn), check=False)
    assert bad.returncode == 1 and "hourai.toml timeout: must be greater than 0" in bad.stderr
    (fn / "hourai.toml").write_text("colour = 'blue'\n")
    bad = d.cli("deploy", "envfn", str(fn), check=False)
    assert "unknown key 'colour'" in bad.stderr
    usage = d.cli("deploy", "envfn", str(fn), "--env", "NOEQUALS", check=False)
    assert usage.returncode == 2 and "KEY=VALUE" in usage.stderr


def _escape_function(where: Path) -> Path:
    """A function whose worker leaves a detached grandchild behind (double fork, setsid):
    no parent-death signal reaches it; the snapshot's pid namespace (root) or the tenant's
    cgroup holds it."""
    return _write_function(
        where,
        "import os, time\n"
        "def handler(event, context):\n"
        "    r, w = os.pipe()\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()\n"
        "        if os.fork() == 0:\n"
        "            os.write(w, str(os.getpid()).encode()); os.close(w)\n"
        "            time.sleep(300)\n"
        "        os._exit(0)\n"
        "    os.close(w)\n"
        "    pidns = os.stat('/proc/self/ns/pid').st_ino\n"
        "    return {'pid': int(os.read(r, 32)), 'pidns': pidns}\n",
    )


def test_kill_9_then_restart_loses_nothing_and_leaves_nothing(hourai_daemon, tmp_path) -> None:
    d = hourai_daemon(NO_SPARES)
    client = Client(d.socket)
    d.cli("deploy", "hello", HELLO)
    d.cli("deploy", "probe", PROBE, "--tenant", "alpha", "--min-warm", "2", "--memory", "256M")
    app = _write_function(tmp_path / "app", "def handler(e, c):\n    return 'one'\n")
    client.deploy("app", str(app), "/", {})
    (app / "handler.py").write_text("def handler(e, c):\n    return 'two'\n")
    v2 = client.deploy("app", str(app), "/", {"timeout": 7})["version"]
    escape = client.deploy(
        "escape", str(_escape_function(tmp_path / "esc")), "/", {"tenant": "esc"}
    )
    assert escape["version"]
    orphan = host_pid(d.proc.pid, d.get("/escape/").json())
    assert d.get("/probe/whoami").status == 200 and d.get("/app/").body == b"two"
    tree = [p for p in psutil.Process(d.proc.pid).children(recursive=True) if p.pid != orphan]
    assert len(tree) >= 6  # root zygote, four snapshots, workers

    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    _gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, f"survived the daemon: {alive}"
    if os.geteuid() == 0:
        # the escaped grandchild was in its snapshot's pid namespace: it went with it
        wait_until(lambda: not _alive(orphan), timeout=10)

    again = hourai_daemon(NO_SPARES)  # same state dir, same cgroup subtree
    print(f"\nrestart to ready (5 functions, one with min_warm 2): {again.ready_after:.2f}s")
    listed = {f["name"]: f for f in Client(again.socket).functions()["functions"]}
    assert set(listed) == {"hello", "probe", "app", "escape"}
    assert all(f["state"] == "serving" for f in listed.values())
    # min_warm: the workers were forked before the daemon said it was ready
    assert listed["probe"]["workers"] >= 2
    assert again.get("/hello/").status == 200 and again.get("/app/").body == b"two"
    shown = Client(again.socket).show("app")
    assert shown["active"] == v2 and len(shown["versions"]) == 2
    assert shown["limits"]["timeout"] == 7.0
    assert again.get("/probe/whoami").status == 200
    if _real_cgroups() is None:
        # the next start cleaned the (now empty) groups the killed daemon left
        assert "removed cgroups left by an earlier run" in again.log
    wait_until(lambda: not _alive(orphan), timeout=10)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _busy(client: Client, name: str) -> bool:
    return client.stats()["functions"][name]["workers"]["busy"] >= 1


def test_sigterm_drains_an_in_flight_request_then_stops_everything(hourai_daemon) -> None:
    d = hourai_daemon(NO_SPARES)
    client = Client(d.socket)
    client.deploy("slow", BEHAVE, "/", {})
    result: dict[str, object] = {}
    t = threading.Thread(target=lambda: result.update(r=d.get("/slow/sleep?s=1")))
    t.start()
    wait_until(lambda: _busy(client, "slow"))
    tree = psutil.Process(d.proc.pid).children(recursive=True)
    d.proc.send_signal(signal.SIGTERM)
    d.wait_for(r"stopping: no new connections; 1 requests in flight")
    with pytest.raises(ConnectionRefusedError):  # no longer accepting
        socket.create_connection(("127.0.0.1", d.port), timeout=2).close()
    t.join(30)
    reply = result["r"]
    assert reply.status == 200 and reply.json() == {"slept": 1.0}  # type: ignore[attr-defined]
    assert d.proc.wait(30) == 0
    _gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive
    assert not d.socket.exists()


@pytest.mark.parametrize("how", ["deadline", "second signal"])
def test_sigterm_stops_waiting_at_the_deadline_or_a_second_signal(hourai_daemon, how) -> None:
    timeout = "0.3" if how == "deadline" else "60"
    d = hourai_daemon(f"drain_timeout = {timeout}\n" + NO_SPARES)
    client = Client(d.socket)
    client.deploy("slow", BEHAVE, "/", {})
    result: dict[str, object] = {}
    t = threading.Thread(target=lambda: result.update(r=d.get("/slow/sleep?s=30")))
    t.start()
    wait_until(lambda: _busy(client, "slow"))
    started = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    if how == "second signal":
        d.wait_for(r"stopping: no new connections")
        d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(20) == 0
    t.join(20)
    assert time.monotonic() - started < 15
    reply = result["r"]
    assert reply.status == 503 and b"shutting down" in reply.body  # type: ignore[attr-defined]
    assert "1 requests still in flight are cut off" in d.log


def test_sighup_reloads_the_config(hourai_daemon) -> None:
    d = hourai_daemon("drain_timeout = 5\n[defaults]\nspares = 0\ntimeout = 30\n")
    client = Client(d.socket)
    client.deploy("plain", BEHAVE, "/", {})
    client.deploy("own", BEHAVE, "/", {"timeout": 9})
    text = d.config.read_text()
    d.config.write_text(
        text.replace("timeout = 30", "timeout = 12").replace(
            "drain_timeout = 5", "[log]\naccess = false\n"
        )
    )
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for(r"config reloaded from .*: changed drain_timeout, log, defaults")
    assert client.show("plain")["limits"]["timeout"] == 12.0  # from the new default
    assert client.show("own")["limits"]["timeout"] == 9.0  # its own value stays
    # a change only a restart can apply is said, not silently half-applied
    d.config.write_text(d.config.read_text().replace("127.0.0.1:0", "127.0.0.1:1"))
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for(r"restart to apply listen")
    # a bad file is refused whole, with the key named; the running config stays
    d.config.write_text("bogus_key = 1\n" + d.config.read_text())
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for(r"reload refused, the running config stays: .*unknown key 'bogus_key'")
    assert client.health()[0] == 200
    assert d.get("/plain/pid").status == 200


def _notify_socket() -> tuple[socket.socket, str]:
    # a short path: AF_UNIX paths have 108 bytes at most
    path = os.path.join(tempfile.mkdtemp(prefix="hn-"), "n")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    return sock, path


def _recv_until(
    sock: socket.socket, messages: list[str], needle: str, timeout: float, since: int = 0
) -> int:
    """Receive until a message after index ``since`` holds ``needle``; returns its index."""
    deadline = time.monotonic() + timeout
    while True:
        for i in range(since, len(messages)):
            if needle in messages[i]:
                return i
        since = max(since, len(messages))
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no {needle!r} within {timeout}s; got {messages}")
        sock.settimeout(remaining)
        messages.append(sock.recv(4096).decode())


def test_systemd_notify_messages(hourai_daemon) -> None:
    sock, path = _notify_socket()
    try:
        d = hourai_daemon(
            NO_SPARES, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}, wait=False
        )
        messages: list[str] = []
        ready = _recv_until(sock, messages, "READY=1", 60)
        assert messages[0] == "STATUS=starting"  # said before anything else
        assert f"MAINPID={d.proc.pid}" in messages[ready]
        assert "STATUS=serving 0 functions" in messages[ready]
        # pings every WATCHDOG_USEC / 2
        first = _recv_until(sock, messages, "WATCHDOG=1", 5, since=ready)
        _recv_until(sock, messages, "WATCHDOG=1", 5, since=first + 1)

        d.proc.send_signal(signal.SIGHUP)
        reloading = _recv_until(sock, messages, "RELOADING=1", 10, since=ready + 1)
        assert "MONOTONIC_USEC=" in messages[reloading]
        _recv_until(sock, messages, "READY=1", 10, since=reloading)

        d.proc.send_signal(signal.SIGTERM)
        stopping = _recv_until(sock, messages, "STOPPING=1", 10)
        assert "STATUS=draining 0 requests" in messages[stopping]
        assert d.proc.wait(30) == 0
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(os.path.dirname(path))


def test_metrics_healthz_and_requests_that_must_not_hurt(hourai_daemon) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    d = hourai_daemon('metrics_listen = "127.0.0.1:0"\n[log]\nformat = "json"\n' + NO_SPARES)
    client = Client(d.socket)
    client.deploy("hello", HELLO, "/", {})
    for _ in range(3):
        assert d.get("/hello/").status == 200
    assert d.get("/nope/").status == 404

    status, ctype, body = client.raw("GET", "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    requests = [s for s in families["hourai_requests"].samples if s.name.endswith("_total")]
    assert sum(s.value for s in requests if s.labels["function"] == "hello") == 3
    assert {s.labels["start"] for s in requests} <= {"warm", "spare", "fork", "cold"}
    latency = families["hourai_request_duration_seconds"].samples
    assert any(s.name.endswith("_count") and s.value == 3 for s in latency)
    workers = {
        s.labels["state"]: s.value
        for s in families["hourai_workers"].samples
        if s.labels["function"] == "hello"
    }
    assert workers["idle"] == 1 and workers["busy"] == 0
    assert "hourai_queue_depth" in families and "hourai_snapshots" in families
    assert "hourai_tenant_memory_bytes" in families and "process_resident_memory_bytes" in families
    assert families["hourai_ready"].samples[0].value == 1

    ok, doc = client.health()
    assert ok == 200 and doc["status"] == "ready" and doc["functions"] == 1

    # the optional TCP address serves /metrics and /healthz, and nothing else
    m = d.wait_for(r"metrics at http://127\.0\.0\.1:(\d+)/metrics")
    from conftest import request

    port = int(m.group(1))
    assert b"hourai_workers" in request(port, "/metrics").body
    assert request(port, "/healthz").status == 200
    assert request(port, "/v1/functions").status == 404

    # malformed requests: a 4xx with a JSON error, and the daemon carries on
    bad = [
        ("PUT", "/v1/functions/x", b"{not json"),
        ("PUT", "/v1/functions/x", b"[1, 2]"),
        ("PUT", "/v1/functions/x", b'{"path": 3}'),
        ("PUT", "/v1/functions/x", b'{"path": "/nowhere", "options": {"colour": 1}}'),
        ("PUT", "/v1/functions/x", b'{"path": "/nowhere", "options": {"timeout": "soon"}}'),
        ("PUT", "/v1/functions/Bad_Name", b'{"path": "/tmp"}'),
        ("PUT", "/v1/functions/x", b'{"path": "/definitely/not/here.py"}'),
        ("POST", "/v1/functions/hello/invoke", b'{"path": "no-slash"}'),
        ("POST", "/v1/functions/hello/invoke", b'{"headers": 5}'),
        ("POST", "/v1/functions/hello/invoke", b'{"body": "!!", "base64": true}'),
        ("POST", "/v1/functions/ghost/invoke", b"{}"),
        ("GET", "/v1/functions/hello/logs?cursor=nonsense", b""),
        ("GET", "/v1/functions/hello/logs?lines=-3", b""),
        ("DELETE", "/v1/stats", b""),
        ("GET", "/v2/anything", b""),
    ]
    for method, path, payload in bad:
        status, ctype, body = client.raw(method, path, data=payload)
        assert 400 <= status < 500, (method, path, status, body)
        assert ctype == "application/json" and "error" in json.loads(body), body
    # bytes that are not HTTP at all
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(d.socket))
        raw.sendall(b"\x16\x03\x01garbage\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.1 400")
    assert client.health()[0] == 200 and d.get("/hello/").status == 200

    # [log] format = "json": every line the daemon wrote is one JSON object
    records = [json.loads(line) for line in d.lines]
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert any(r["logger"] == "hourai.access" and "hello GET /hello/" in r["msg"] for r in records)


@needs_cgroups
def test_two_tenants_in_one_daemon_are_separated(hourai_daemon) -> None:
    d = hourai_daemon(NO_SPARES)
    d.cli("deploy", "a", PROBE, "--tenant", "alpha")
    d.cli("deploy", "b", PROBE, "--tenant", "beta")
    a, b = d.get("/a/whoami").json(), d.get("/b/whoami").json()
    assert a["uid"] != b["uid"] and 0 not in (a["uid"], b["uid"])
    assert any(line.endswith(f"/{d.subtree}/alpha") for line in a["cgroups"])
    assert any(line.endswith(f"/{d.subtree}/beta") for line in b["cgroups"])
    secret = d.get("/b/write?name=s.txt&text=beta-only").json()["written"]
    assert d.get(f"/a/read?path={secret}").json() == {"error": "FileNotFoundError"}
    b_pid = host_pid(d.proc.pid, b)
    assert d.get(f"/a/signal?pid={b_pid}").json() == {"error": "ProcessLookupError"}
    assert psutil.pid_exists(b_pid)
    assert d.get(f"/b/read?path={secret}").json() == {"read": "beta-only"}


def test_a_corrupt_state_file_is_reported_never_dropped(hourai_daemon, tmp_path) -> None:
    d = hourai_daemon(NO_SPARES)
    client = Client(d.socket)
    client.deploy("good", HELLO, "/", {})
    client.deploy("bad", HELLO, "/", {})
    assert d.stop() == 0
    record = d.state / "functions" / "bad.json"
    record.write_bytes(record.read_bytes()[:40])  # as a disk that lost the tail would
    again = hourai_daemon(NO_SPARES)
    assert f"state file {record} is corrupt" in again.log
    client = Client(again.socket)
    listed = {f["name"]: f["state"] for f in client.functions()["functions"]}
    assert listed == {"good": "serving", "bad": "corrupt"}
    assert again.get("/good/").status == 200
    assert any("bad.json is corrupt" in p for p in client.health()[1]["problems"])
    with pytest.raises(ApiFailure) as refused:
        client.deploy("bad", HELLO, "/", {})
    assert refused.value.status == 409
    assert len(record.read_bytes()) == 40  # left exactly as it was
    out = again.cli("rm", "bad").stdout
    assert "corrupt record was moved to" in out and not record.exists()
    assert list(record.parent.glob("bad.json.corrupt-*"))
    client.deploy("bad", HELLO, "/", {})
    assert again.get("/bad/").status == 200


def test_one_daemon_per_state_dir_and_a_clear_error_without_one(hourai_daemon) -> None:
    d = hourai_daemon()
    second = hourai_daemon(wait=False)  # same state dir
    assert second.proc.wait(60) == 1
    assert f"another hourai daemon (pid {d.proc.pid}) uses the state dir" in second.log
    assert Client(d.socket).health()[0] == 200
    result = subprocess.run(
        [sys.executable, "-m", "hourai", "ls", "--socket", str(d.state / "none.sock")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 3
    assert "no hourai daemon" in result.stderr and "hourai daemon" in result.stderr


@pytest.mark.slow
def test_500_functions(hourai_daemon, tmp_path) -> None:
    """500 copies of one tiny function: no worker, only a snapshot each (spares 0)."""
    d = hourai_daemon(NO_SPARES)
    fn = _write_function(tmp_path / "tiny", "def handler(e, c):\n    return 'tiny'\n")
    client = Client(d.socket)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: client.deploy(f"f{i}", str(fn), "/", {}), range(500)))
    deploy_s = time.perf_counter() - t0
    assert len({a["version"] for a in answers}) == 1

    t0 = time.perf_counter()
    listed = json.loads(d.cli("ls", "--json").stdout)["functions"]
    ls_cli_s = time.perf_counter() - t0
    assert len(listed) == 500 and {f["state"] for f in listed} == {"serving"}
    t0 = time.perf_counter()
    client.functions()
    ls_api_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = client.metrics()
    metrics_s = time.perf_counter() - t0
    assert metrics.count("hourai_workers{") == 500 * 5
    assert d.get("/f499/").body == b"tiny" and d.get("/f0/").body == b"tiny"
    print(
        f"\n500 functions: deploy {deploy_s:.1f}s (8 at a time); `hourai ls --json` "
        f"{ls_cli_s * 1e3:.0f} ms (API {ls_api_s * 1e3:.0f} ms); /metrics {metrics_s * 1e3:.0f} "
        f"ms ({len(metrics) >> 10} KiB)"
    )


def test_the_systemd_unit_asks_for_what_the_daemon_does() -> None:
    import configparser

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(REPO / "contrib" / "systemd" / "hourai.service")
    service = unit["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["ExecStart"].split()[1:3] == ["daemon", "--config"]
    assert service["ExecReload"].endswith("-HUP $MAINPID")
    assert service["Delegate"] == "yes" and service["KillMode"] == "mixed"
    assert service["StateDirectory"] == "hourai" and service["RuntimeDirectory"] == "hourai"
    assert int(service["WatchdogSec"]) > 0
    # systemd must not SIGKILL a daemon that is still within its default drain_timeout
    from hourai.config import Config

    assert int(service["TimeoutStopSec"]) > Config().drain_timeout
