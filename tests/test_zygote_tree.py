"""The zygote tree: functions that import the same packages fork their snapshots from one
package zygote that imported them once; lazy imports are learned and done before workers
fork; tenants never share a zygote; a function is never given a package it does not use.

Real daemons, real wheels (tests/wheels.py), real process trees read from /proc.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
from conftest import wait_until
from hypothesis import given
from hypothesis import strategies as st
from wheels import build_wheel

from hourai.snapshot.tree import MIN_SHARED, parent_set, plan_group

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="package zygotes are told apart by their sandboxes: needs root"
)

HEAVY = """\
import os
print("heavy imported for", repr(os.environ.get("HOURAI_FUNCTION")), flush=True)
LOADED_IN = os.getpid()
TABLE = [str(i) * 3 for i in range(20000)]  # pages worth sharing
"""

_REPLY = """
def _reply(before):
    return {"pid": os.getpid(), "pidns": os.stat("/proc/self/ns/pid").st_ino,
            "heavy_before": before,
            "modules": sorted(m for m in ("heavy", "other") if m in sys.modules)}
"""

EAGER = (
    "import os, sys\nimport heavy\n"
    + _REPLY
    + "\ndef handler(event, context):\n    return _reply(True)\n"
)

LAZY = (
    "import os, sys\n"
    + _REPLY
    + """
def handler(event, context):
    before = "heavy" in sys.modules
    import heavy  # inside the handler, as SeBS's wrappers do
    return _reply(before)
"""
)

OTHER = (
    "import os, sys\nimport other\n"
    + _REPLY
    + '\ndef handler(event, context):\n    return _reply("heavy" in sys.modules)\n'
)


def _wheels(where: Path) -> Path:
    build_wheel(where, "heavy", "1.0", {"heavy/__init__.py": HEAVY})
    build_wheel(where, "other", "1.0", {"other/__init__.py": "VALUE = 1\n"})
    return where


def _config(wheels: Path) -> str:
    return (
        "keep_versions = 1\n[defaults]\nspares = 0\nkeep_alive = 0.3\n"
        f'[packages]\nno_index = true\nfind_links = ["{wheels}"]\n'
    )


def _function(root: Path, name: str, code: str, requirements: str = "heavy\nother\n") -> Path:
    where = root / name
    where.mkdir(parents=True)
    where.chmod(0o755)
    (where / "handler.py").write_text(code)
    (where / "requirements.txt").write_text(requirements)
    for f in where.iterdir():
        f.chmod(0o644)
    return where


def _call(d, name: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    reply = d.get(f"/{name}/")
    assert reply.status == 200, reply.body
    return json.loads(reply.body)  # type: ignore[no-any-return]


def _zygotes(d) -> list[dict]:  # type: ignore[no-untyped-def,type-arg]
    return d.cli_json("stats")["zygotes"]  # type: ignore[no-any-return]


def _zygote_pid(d) -> int:  # type: ignore[no-untyped-def]
    (zygote,) = _zygotes(d)
    return int(zygote["pid"])


def _below(zygote_pid: int, reply: dict) -> bool:  # type: ignore[type-arg]
    """Whether the worker that sent ``reply`` runs below that zygote: in its sandbox, the pid
    namespace it is pid 1 of (a snapshot of the root zygote has one of its own)."""
    return reply["pidns"] == os.stat(f"/proc/{zygote_pid}/ns/pid").st_ino


def _settles(d, name: str, want) -> dict:  # type: ignore[no-untyped-def,type-arg]
    """Call ``name`` until its answer satisfies ``want``: the tree moves a snapshot only once
    the function has no workers (keep_alive is 0.3 s here), so answers change over calls."""
    seen: list[dict] = []  # type: ignore[type-arg]

    def ok() -> bool:
        got = _call(d, name)
        seen.append(got)
        if want(got):
            return True
        time.sleep(0.6)  # let the worker go, and the tree rebuild the snapshot
        return False

    wait_until(ok, timeout=60)
    return seen[-1]


@needs_root
def test_a_lazy_import_is_learned_and_done_before_the_next_workers_fork(
    hourai_daemon, tmp_path: Path
) -> None:
    d = hourai_daemon(_config(_wheels(tmp_path / "wheels")))
    d.cli("deploy", "lazy", str(_function(Path(hourai_daemon.root), "lazy", LAZY)))
    first = _call(d, "lazy")
    assert first["heavy_before"] is False  # nothing known yet: the handler imports it
    # learned from that first invocation: a later worker finds it imported already
    _settles(d, "lazy", lambda got: got["heavy_before"])
    # alone in its group it needs no zygote: its snapshot preloads it itself
    assert _zygotes(d) == []
    # and it stays learned across a restart: the first worker after it has it at once
    d.stop()
    again = hourai_daemon(_config(tmp_path / "wheels"))  # the same state dir
    assert _call(again, "lazy")["heavy_before"] is True


@needs_root
def test_a_function_declares_its_own_preload(hourai_daemon, tmp_path: Path) -> None:
    d = hourai_daemon(_config(_wheels(tmp_path / "wheels")))
    where = _function(Path(hourai_daemon.root), "declared", LAZY)
    (where / "hourai.toml").write_text('preload = ["heavy"]\n')
    (where / "hourai.toml").chmod(0o644)
    d.cli("deploy", "declared", str(where))
    assert _call(d, "declared")["heavy_before"] is True  # from the very first worker
    (where / "hourai.toml").write_text('preload = ["no such module"]\n')
    refused = d.cli("deploy", "declared", str(where), check=False)
    assert refused.returncode != 0 and "not a module name" in refused.stderr


@needs_root
def test_functions_using_the_same_packages_fork_from_one_zygote(
    hourai_daemon, tmp_path: Path
) -> None:
    d = hourai_daemon(_config(_wheels(tmp_path / "wheels")))
    root = Path(hourai_daemon.root)
    for name, code in (("e1", EAGER), ("e2", EAGER), ("l1", LAZY), ("o1", OTHER)):
        d.cli("deploy", name, str(_function(root, name, code)), "--tenant", "acme")
    for name in ("e1", "e2", "l1", "o1"):
        _call(d, name)
    # heavy is used by e1, e2 and (lazily) l1: one zygote of acme's imports it
    wait_until(lambda: [z["packages"] for z in _zygotes(d)] == [["heavy"]], timeout=30)
    (zygote,) = _zygotes(d)
    assert zygote["tenant"] == "acme" and zygote["functions"] == 3
    assert zygote["imported"] == ["heavy"] and zygote["parent"] == "root"
    for name in ("e1", "e2", "l1"):
        got = _settles(d, name, lambda got: _below(_zygote_pid(d), got))
        assert got["heavy_before"] is True
    # o1 uses other, not heavy: never forked from a zygote that imported heavy
    for _ in range(3):
        got = _call(d, "o1")
        assert got["modules"] == ["other"], got
        assert not _below(_zygote_pid(d), got)
    text = d.cli("stats").stdout
    assert "ZYGOTE" in text and "heavy" in text


@needs_root
def test_tenants_never_share_a_zygote(hourai_daemon, tmp_path: Path) -> None:
    d = hourai_daemon(_config(_wheels(tmp_path / "wheels")))
    root = Path(hourai_daemon.root)
    for tenant in ("red", "blue"):
        for i in (1, 2):
            name = f"{tenant}{i}"
            d.cli("deploy", name, str(_function(root, name, EAGER)), "--tenant", tenant)
            _call(d, name)
    # a function of blue's named like the other tenant: red's zygote never writes its log
    d.cli("deploy", "red", str(_function(root, "red", EAGER)), "--tenant", "blue")
    _call(d, "red")
    wait_until(lambda: len(_zygotes(d)) == 2, timeout=30)
    by_tenant = {z["tenant"]: z for z in _zygotes(d)}
    assert set(by_tenant) == {"red", "blue"}
    for tenant in ("red", "blue"):
        other = "blue" if tenant == "red" else "red"
        mine, theirs = by_tenant[tenant]["pid"], by_tenant[other]["pid"]
        got = _settles(d, f"{tenant}1", lambda got, mine=mine: _below(mine, got))
        assert not _below(theirs, got)
        # each tenant's zygote runs as that tenant, never as root
        uid = d.cli_json("stats")["tenants"][tenant].get("uid")
        assert psutil.Process(mine).uids().real == (uid if uid is not None else os.geteuid())
    # what a zygote prints is its tenant's, in a log of its own
    logs = d.state / "logs"
    wait_until(lambda: "heavy imported for ''" in _read(logs / "zygote.red.log"))
    assert "heavy imported for 'red'" in _read(logs / "red.log")
    assert "''" not in _read(logs / "red.log")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


# A package that attacks only from a zygote (there HOURAI_FUNCTION is empty), so its
# functions deploy and serve: a length prefix no frame may have, on the zygote's channel.
SNEAKY = """\
import os, socket, stat, struct
if not os.environ.get("HOURAI_FUNCTION"):
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = int(name)
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                sock = socket.socket(fileno=os.dup(fd))
                if sock.family == socket.AF_UNIX:
                    sock.sendall(struct.pack(">I", 0xFFFFFFF0))
        except OSError:
            pass
"""


@needs_root
def test_a_zygote_that_forges_frames_is_killed_and_not_restarted_in_a_loop(
    hourai_daemon, tmp_path: Path
) -> None:
    wheels = _wheels(tmp_path / "wheels")
    build_wheel(wheels, "sneaky", "1.0", {"sneaky/__init__.py": SNEAKY})
    d = hourai_daemon(_config(wheels))
    root = Path(hourai_daemon.root)
    code = EAGER.replace("import heavy", "import heavy, sneaky")
    for name in ("s1", "s2"):
        d.cli("deploy", name, str(_function(root, name, code, "heavy\nsneaky\n")))
        _call(d, name)
    wait_until(lambda: "broke the channel protocol" in "\n".join(d.lines), timeout=30)
    assert any("lost" in line and "not started again" in line for line in d.lines)
    # its functions serve on, from snapshots of their own, and the zygote stays down
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        for name in ("s1", "s2"):
            assert _call(d, name)["modules"] == ["heavy"]
        time.sleep(0.2)
    assert sum("broke the channel protocol" in line for line in d.lines) == 1
    assert _zygotes(d) == []


# ---------------------------------------------------------------------- the plan, as a function

_SETS = st.frozensets(st.sampled_from(["flask", "jinja2", "numpy", "pandas", "redis", "attr"]))


@given(st.dictionaries(st.text("abcdefgh", min_size=1, max_size=3), _SETS, max_size=30))
def test_a_plan_never_gives_a_function_a_package_it_does_not_use(used) -> None:  # type: ignore[no-untyped-def]
    plan = plan_group(used)
    assert set(plan) == set(used)
    taken = Counter(s for s in plan.values() if s)
    for name, zygote in plan.items():
        assert zygote <= used[name]  # only what it imports itself
    assert all(n >= MIN_SHARED for n in taken.values())  # one user alone: saves nothing
    for name, zygote in plan.items():
        # the deepest: no zygote of the plan that it could use holds more of its packages
        assert not any(z <= used[name] and len(z) > len(zygote) for z in taken)


def test_a_plan_shares_what_functions_have_in_common() -> None:
    flask, pandas = frozenset({"flask", "jinja2"}), frozenset({"pandas", "numpy"})
    used = {"a": flask, "b": flask, "c": flask | {"redis"}, "d": pandas, "e": pandas, "f": set()}
    plan = plan_group({k: frozenset(v) for k, v in used.items()})
    assert plan == {"a": flask, "b": flask, "c": flask, "d": pandas, "e": pandas, "f": frozenset()}
    # three functions using flask+redis make a deeper zygote, forked from the flask one
    used |= {"g": flask | {"redis"}}
    plan = plan_group({k: frozenset(v) for k, v in used.items()})
    assert plan["c"] == plan["g"] == flask | {"redis"} and plan["a"] == flask
    assert parent_set(flask | {"redis"}, set(plan.values())) == flask
