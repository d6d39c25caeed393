"""A hostile tenant, for real: functions that try to read, see, signal, outlive and starve
another tenant, a second hourai instance that collides with the first, and a daemon killed
under its tenants. Each test runs the attack from inside a function and asserts that it
fails and that the victim keeps serving.

They need root and the real cgroup hierarchy (uids, namespaces and cgroups are only given by
a root daemon); elsewhere they skip and say why.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import FUNCTIONS, REPO, host_pid, request, wait_until

from hourai.cgroup import detect
from hourai.client import Client

HOSTILE = str(FUNCTIONS / "hostile.py")
PROBE = str(FUNCTIONS / "tenant_probe.py")
NO_SPARES = "[defaults]\nspares = 0\n"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root: per-tenant uids, namespaces and cgroups come only from a root daemon"
    backend = detect("auto", subtree="hourai-probe")
    if backend.name == "none":
        return f"no usable cgroup hierarchy on this host: {backend.describe()}"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")


@pytest.fixture
def daemon_root() -> Path:
    """State dirs where a daemon keeps them (/var/lib), not in /tmp: a function's /tmp is a
    tmpfs of its own, so a state dir under /tmp would be out of the attacker's sight for a
    reason that has nothing to do with its permissions, which are what is tested here."""
    return Path("/var/lib")


def _post(port: int, path: str, doc: object) -> dict:  # type: ignore[type-arg]
    reply = request(port, path, "POST", json.dumps(doc).encode())
    assert reply.status == 200, reply.body
    return reply.json()  # type: ignore[return-value]


def _tagged(tag: str) -> list[psutil.Process]:
    """Host processes running the shell loop hostile.py starts with ``tag`` in it."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if f"done # {tag}" in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def _victim(root: Path) -> Path:
    """A function directory full of secrets: in its code, its .env and its hourai.toml."""
    src = root / "victim"
    src.mkdir()
    (src / "handler.py").write_text(
        "import os\nCODE_SECRET = 'code-secret-7f3a'\n\n"
        "def handler(event, context):\n    return {'token': os.environ.get('TOKEN')}\n"
    )
    (src / ".env").write_text("DOTENV_SECRET=dotenv-secret-91c2\n")
    (src / "hourai.toml").write_text('tenant = "victim"\n[env]\nTOKEN = "toml-secret-44d0"\n')
    return src


# ---------------------------------------------------------------------- reading


def test_a_tenant_reads_nothing_of_another_tenant_in_the_state_dir(hourai_daemon) -> None:
    d = hourai_daemon(NO_SPARES)
    src = _victim(hourai_daemon.root)
    d.cli("deploy", "victim", str(src / "handler.py"), "--env-file", str(src / ".env"))
    d.cli("deploy", "evil", HOSTILE, "--tenant", "evil")
    assert d.get("/victim/").json() == {"token": "toml-secret-44d0"}
    code = Path(d.cli_json("show", "victim")["code"])
    # Every file and directory the daemon keeps, as the host sees them.
    everything = [str(p) for p in d.state.rglob("*")]
    assert str(code / ".env") in everything and any("functions" in p for p in everything)
    opened = _post(d.port, "/evil/readall", {"paths": everything})["opened"]
    evil_code = Path(d.cli_json("show", "evil")["code"])
    # ... of which the attacker opens its own code and nothing else
    assert all(Path(p).is_relative_to(evil_code) for p in opened), opened
    assert d.get(f"/evil/list?path={d.state / 'code'}").json()["error"] == "PermissionError"
    assert d.get(f"/evil/read?path={code / 'handler.py'}").json()["error"] == "PermissionError"
    # its own code: readable, not writable
    assert "read" in d.get(f"/evil/read?path={evil_code / 'hostile.py'}").json()
    tampered = d.get(f"/evil/write?path={evil_code / 'hostile.py'}").json()
    assert tampered["error"] in {"PermissionError", "OSError"}
    # the victim's secrets are in no file the attacker could open, and it keeps serving
    assert d.get("/victim/").json() == {"token": "toml-secret-44d0"}


def test_a_tenant_sees_only_its_own_processes(hourai_daemon) -> None:
    d = hourai_daemon(NO_SPARES)
    src = _victim(hourai_daemon.root)
    d.cli("deploy", "victim", str(src / "handler.py"))
    d.cli("deploy", "evil", HOSTILE, "--tenant", "evil")
    d.get("/victim/")
    seen = d.get("/evil/processes").json()["processes"]
    # the snapshot (pid 1 of its namespace) and the worker answering: nothing of the host
    assert set(seen) == {"1", "2"}, seen
    assert all("hourai.snapshot.zygote" in cmd for cmd in seen.values()), seen
    victim_worker = max(detect("auto", subtree=d.subtree).pids("victim"))
    # host pids name nothing in there: not the victim, the daemon, the root zygote, init
    root_zygote = psutil.Process(d.proc.pid).children()[0].pid
    for pid in (victim_worker, d.proc.pid, root_zygote):
        assert d.get(f"/evil/signal?pid={pid}&sig=9").json()["error"] == "ProcessLookupError"
        assert d.get(f"/evil/read?path=/proc/{pid}/environ").json()["error"] == (
            "FileNotFoundError"
        )
    assert psutil.pid_exists(victim_worker) and d.get("/victim/").status == 200


def test_environment_holds_only_what_the_function_was_given(hourai_run) -> None:
    proc = hourai_run(HOSTILE, "--spares", "0", env={"DAEMON_ONLY_SECRET": "daemon-3e1b"})
    env = request(proc.port, "/whoami").json()["env"]
    assert "DAEMON_ONLY_SECRET" not in env
    assert env["TMPDIR"] == env["HOME"] == "/tmp"


# ---------------------------------------------------------------------- /tmp and /dev/shm


def test_tmp_is_private_to_each_function_and_kept_while_it_lives(hourai_run) -> None:
    a = hourai_run(HOSTILE, "--tenant", "alpha", "--spares", "0")
    b = hourai_run(HOSTILE, "--tenant", "beta", "--spares", "0")
    tag = secrets.token_hex(4)
    # a faasdom-style function writes /tmp/test/...: works in both tenants
    for proc in (a, b):
        assert request(proc.port, f"/write?path=/tmp/test/{tag}&text=x").json() == {
            "written": f"/tmp/test/{tag}"
        }
    request(a.port, f"/write?path=/dev/shm/{tag}&text=alpha-only")
    assert request(b.port, f"/read?path=/dev/shm/{tag}").json()["error"] == "FileNotFoundError"
    assert request(b.port, f"/read?path=/tmp/test/{tag}").json() == {"read": "x"}
    # the host's /tmp and /dev/shm got none of it
    assert not Path(f"/tmp/test/{tag}").exists() and not Path(f"/dev/shm/{tag}").exists()
    # kept across warm invocations
    assert request(a.port, f"/read?path=/dev/shm/{tag}").json() == {"read": "alpha-only"}


def test_every_shared_writable_place_of_the_host_is_private_inside(hourai_run) -> None:
    """Whatever directory any user may write to on this host, a function's writes there stay
    its own (a /tmp-like place left out would be a channel between tenants)."""
    writable = []
    for top in ("/tmp", "/var", "/dev", "/run", "/home", "/srv", "/opt", "/usr", "/etc"):
        for dirpath, dirnames, _files in os.walk(top):
            dirnames[:] = [n for n in dirnames if not n.startswith("hourai-")]
            mode = os.stat(dirpath).st_mode
            if mode & 0o002:
                writable.append(dirpath)
    assert "/tmp" in writable
    proc = hourai_run(HOSTILE, "--spares", "0")
    tag = secrets.token_hex(4)
    took = _post(proc.port, f"/mark?tag={tag}", {"dirs": writable})["took"]
    leaked = [d for d in took if Path(d, f"hostile-{tag}").exists()]
    for d in leaked:
        Path(d, f"hostile-{tag}").unlink()
    assert leaked == [], f"a function's files appeared on the host in {leaked}"


def test_filling_tmp_hits_the_functions_own_limit_and_nobody_notices(hourai_run) -> None:
    hog = hourai_run(HOSTILE, "--tenant", "hog", "--spares", "0", "--tmp-size", "16M")
    other = hourai_run(HOSTILE, "--tenant", "bystander", "--spares", "0")
    state_disk = psutil.disk_usage("/tmp").free
    filled = request(hog.port, "/fill?path=/dev/shm/fill").json()
    assert filled["error"] == "ENOSPC" and filled["written"] <= 16 << 20
    # /tmp and /dev/shm share the one limit
    assert request(hog.port, "/fill?path=/tmp/more").json()["written"] < 1 << 20
    assert abs(psutil.disk_usage("/tmp").free - state_disk) < 8 << 20
    assert request(other.port, "/fill?path=/tmp/small").json()["written"] > 16 << 20
    assert request(hog.port, "/whoami").status == 200


def test_tmp_is_gone_with_the_snapshot(hourai_daemon) -> None:
    d = hourai_daemon(NO_SPARES)
    d.cli("deploy", "fn", HOSTILE)
    d.get("/fn/write?path=/tmp/left&text=behind")
    assert d.get("/fn/read?path=/tmp/left").json() == {"read": "behind"}
    d.cli("rm", "fn")
    d.cli("deploy", "fn", HOSTILE)
    assert d.get("/fn/read?path=/tmp/left").json()["error"] == "FileNotFoundError"


# ---------------------------------------------------------------------- outliving


def test_an_escaped_process_dies_with_its_worker(hourai_run) -> None:
    proc = hourai_run(HOSTILE, "--spares", "0")
    tag = f"escapee-{secrets.token_hex(6)}"
    assert request(proc.port, f"/escape?tag={tag}").json() == {"escaped": tag}
    wait_until(lambda: len(_tagged(tag)) == 1)
    escapee = _tagged(tag)[0]
    assert escapee.ppid() != 1  # it left its group and session, but not our tree
    # the worker dies (any way it can): what it started goes with it
    assert request(proc.port, "/die").status == 502
    wait_until(lambda: not _tagged(tag), timeout=10)
    assert request(proc.port, "/whoami").status == 200


def test_nothing_of_a_removed_function_is_left(hourai_daemon) -> None:
    d = hourai_daemon(NO_SPARES)
    d.cli("deploy", "fn", HOSTILE, "--tenant", "leaver")
    tag = f"escapee-{secrets.token_hex(6)}"
    d.get(f"/fn/escape?tag={tag}")
    wait_until(lambda: len(_tagged(tag)) == 1)
    d.cli("rm", "fn")
    wait_until(lambda: not _tagged(tag), timeout=10)
    backend = detect("auto", subtree=d.subtree)
    wait_until(lambda: backend.pids("leaver") == [], timeout=10)


def test_killing_the_daemon_mid_import_leaves_no_tenant_process(hourai_daemon) -> None:
    d = hourai_daemon(NO_SPARES)
    tag = f"import-{secrets.token_hex(6)}"
    deploy = subprocess.Popen(
        [
            *(sys.executable, "-m", "hourai", "deploy", "slow", HOSTILE),
            *("--socket", str(d.socket), "--tenant", "slow"),
            *("--env", f"HOSTILE_IMPORT_TAG={tag}"),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # the snapshot has dropped to the tenant's uid and is running module-level code
        wait_until(lambda: len(_tagged(tag)) == 1, timeout=30)
        tree = psutil.Process(d.proc.pid).children(recursive=True)
        assert any(p.uids().real != 0 for p in tree)
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(10)
        wait_until(lambda: not any(p.is_running() and p.status() != "zombie" for p in tree), 10)
        assert not _tagged(tag)
    finally:
        deploy.kill()
        deploy.wait()


# ---------------------------------------------------------------------- a second instance


def test_two_instances_never_share_a_uid(hourai_run) -> None:
    first = hourai_run(HOSTILE, "--spares", "0")  # both as tenant "default"
    second = hourai_run(HOSTILE, "--spares", "0")
    one, two = request(first.port, "/whoami").json(), request(second.port, "/whoami").json()
    assert one["uid"] != two["uid"]
    target = host_pid(second.proc.pid, two)
    assert request(first.port, f"/signal?pid={target}&sig=9").json()["error"] == (
        "ProcessLookupError"
    )
    assert request(second.port, "/whoami").status == 200
    # a `hourai run` gives its uids back when it stops
    lease = Path("/run/hourai/uids", str(two["uid"]))
    assert json.loads(lease.read_text())["pid"] == second.proc.pid
    assert second.stop(timeout=60) == 0  # a clean stop (one killed leaves a stale lease)
    # Given back: no longer held by it. (Another `hourai run` of a parallel test may take the
    # same uid at once: every instance's tenant "default" starts its search at the same uid.)
    assert _lease_holder(lease) != second.proc.pid


def _lease_holder(lease: Path) -> int | None:
    try:
        return int(json.loads(lease.read_text())["pid"])
    except FileNotFoundError:
        return None


def test_a_second_daemon_on_the_same_subtree_refuses_to_start(hourai_daemon) -> None:
    first = hourai_daemon(NO_SPARES)
    first.cli("deploy", "fn", HOSTILE, "--tenant", "keeper")
    assert first.get("/fn/whoami").status == 200
    second = hourai_daemon(NO_SPARES, name="intruder", wait=False)
    assert second.proc.wait(60) != 0
    message = second.wait_for(r"belongs to another running hourai").string
    assert f"pid {first.proc.pid}" in message and str(first.state) in message
    assert "cgroup_subtree" in message
    # the first daemon lost nothing
    assert first.get("/fn/whoami").status == 200
    assert detect("auto", subtree=first.subtree).pids("keeper")


def test_a_vanished_tenant_group_is_recreated_and_reported(hourai_daemon) -> None:
    d = hourai_daemon(NO_SPARES)
    d.cli("deploy", "fn", HOSTILE, "--tenant", "gone", "--pids", "50")
    assert d.get("/fn/whoami").status == 200
    backend = detect("auto", subtree=d.subtree)
    backend.remove("gone")  # what a careless second daemon did: kill everything, rmdir
    health = Client(d.socket).health()[1]
    assert any("tenant gone" in p and "cgroup is gone" in p for p in health["problems"]), health
    # the next requests heal it: at most one answer is an error, then it serves again
    statuses = [d.get("/fn/whoami").status for _ in range(3)]
    assert statuses[-1] == 200 and statuses.count(200) >= 2, statuses
    assert backend.exists("gone") and backend.pids("gone")
    status, doc = Client(d.socket).health()
    assert status == 200 and doc["problems"] == []
    pids_max = Path(next(p for p in backend.subtree_dirs() if "/pids/" in p), "gone", "pids.max")
    assert pids_max.read_text().strip() == "50"
