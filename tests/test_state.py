"""The persistent registry (one JSON file per function) and the per-function log files."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hourai.logs import FunctionLogs
from hourai.state import (
    FunctionRecord,
    StateError,
    StateStore,
    VersionRecord,
    from_json,
    to_json,
)


def version(v: str, status: str = "ok", activated: float | None = None, **kw) -> VersionRecord:  # type: ignore[no-untyped-def]
    fields = {
        "version": v,
        "code": "ab" * 32,
        "module": "handler",
        "attr": None,
        "source": "fn/handler.py",
        "file": "fn/handler.py",
        "kind": None,
        "tenant": "default",
        "env": {"SECRET": "s3cret"},
        "options": {"timeout": 3.0, "memory": 1 << 27},
        "deployed_at": 1000.0,
        "status": status,
        "activated_at": activated,
    }
    fields.update(kw)
    return VersionRecord(**fields)


def record(name: str = "hello") -> FunctionRecord:
    r = FunctionRecord(name, created_at=999.0)
    r.put(version("aaa", activated=1.0))
    r.put(version("bbb", status="refused", error="SyntaxError"))
    r.put(version("ccc", activated=2.0))
    r.active = "ccc"
    return r


def test_a_record_round_trips_and_its_file_is_private(tmp_path) -> None:
    store = StateStore(tmp_path)
    store.write(record())
    path = tmp_path / "functions" / "hello.json"
    assert path.stat().st_mode & 0o777 == 0o600  # environments may hold secrets
    assert (tmp_path / "functions").stat().st_mode & 0o777 == 0o700
    assert json.loads(path.read_text())["schema"] == 1
    records, problems = store.load()
    assert problems == {} and records["hello"] == record()


def test_previous_and_prune() -> None:
    r = record()
    assert r.previous().version == "aaa"  # type: ignore[union-attr]
    r.active = "aaa"
    assert r.previous().version == "ccc"  # type: ignore[union-attr]  (back and forth)
    dropped = r.prune(2)
    assert [v.version for v in dropped] == ["bbb"] and r.active_version is not None
    assert [v.version for v in r.prune(1)] == ["ccc"]
    assert [v.version for v in r.versions] == ["aaa"]  # the active one is never dropped


def test_a_deploy_interrupted_by_a_crash_is_marked_so(tmp_path) -> None:
    store = StateStore(tmp_path)
    r = record()
    r.put(version("ddd", status="pending"))
    store.write(r)
    loaded = store.load()[0]["hello"]
    assert loaded.active == "ccc"  # the active version only moves once a build succeeded
    assert loaded.version("ddd").status == "interrupted"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "it is empty"),
        (b'{"schema": 1, "kind": "hourai.fun', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "not a hourai function record"),
        (b'{"schema": 1, "kind": "something else"}', "not a hourai function record"),
        (b'{"kind": "hourai.function"}', "no schema version"),
        (
            b'{"schema": 1, "kind": "hourai.function", "name": "other", "versions": []}',
            "it names function 'other'",
        ),
        (
            b'{"schema": 1, "kind": "hourai.function", "name": "hello", "created_at": 1,'
            b' "active": "zzz", "versions": []}',
            "active version 'zzz' is not among its versions",
        ),
        (
            b'{"schema": 1, "kind": "hourai.function", "name": "hello", "created_at": 1,'
            b' "active": null, "versions": [{"version": "a"}]}',
            "a version lacks code, module, source, tenant",
        ),
    ],
)
def test_corruption_is_detected_and_named(tmp_path, content: bytes, why: str) -> None:
    store = StateStore(tmp_path)
    store.write(record("fine"))
    bad = tmp_path / "functions" / "hello.json"
    bad.write_bytes(content)
    records, problems = store.load()
    assert set(records) == {"fine"}  # the others are unharmed
    message = str(problems["hello"])
    assert f"state file {bad} is corrupt: {why}" in message
    assert "hourai rm hello" in message
    assert bad.read_bytes() == content  # left exactly as it was


def test_a_path_in_a_code_digest_is_corruption(tmp_path) -> None:
    data = json.loads(to_json(record()))
    data["versions"][0]["code"] = "../../etc"
    with pytest.raises(StateError, match="bad code digest"):
        from_json(json.dumps(data).encode(), tmp_path / "hello.json")


def test_a_newer_schema_says_to_upgrade(tmp_path) -> None:
    data = json.loads(to_json(record()))
    data["schema"] = 99
    with pytest.raises(StateError, match="written by a newer version; upgrade hourai"):
        from_json(json.dumps(data).encode(), tmp_path / "hello.json")


def test_leftover_temp_files_are_removed_and_corrupt_ones_set_aside(tmp_path) -> None:
    store = StateStore(tmp_path)
    store.write(record())
    leftover = tmp_path / "functions" / ".hello.json.x1y2.tmp"
    leftover.write_bytes(b'{"half": ')
    assert store.load()[1] == {} and not leftover.exists()
    (tmp_path / "functions" / "hello.json").write_bytes(b"garbage")
    aside = store.set_aside("hello")
    assert aside is not None and aside.read_bytes() == b"garbage"
    assert store.load() == ({}, {})


@given(st.binary(max_size=300))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=200)
def test_any_bytes_load_as_a_record_or_a_named_error(tmp_path, data: bytes) -> None:
    try:
        from_json(data, tmp_path / "hello.json")
    except StateError as exc:
        assert str(tmp_path / "hello.json") in str(exc)


_WRITER = """
import sys, time
from pathlib import Path
from hourai.state import FunctionRecord, StateStore, VersionRecord
store = StateStore(Path(sys.argv[1]))
n = 0
print("writing", flush=True)
while True:
    n += 1
    r = FunctionRecord(f"f{n % 7}", created_at=n)
    for i in range(n % 40 + 1):
        r.put(VersionRecord(f"v{i}", "ab" * 32, "m", None, "s", None, None, "t",
                            {"K": "x" * (n % 500)}, {}, float(i), "ok"))
    r.active = "v0"
    store.write(r)
"""


def test_a_writer_killed_at_any_moment_leaves_whole_records(tmp_path) -> None:
    """SIGKILL a process that rewrites records as fast as it can: every file left is whole."""
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert proc.stdout is not None and proc.stdout.readline() == "writing\n"
        wait_until(lambda: len(list((tmp_path / "functions").glob("*.json"))) == 7)
        time.sleep(0.05)  # let it be mid-write somewhere; any moment is as good
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        records, problems = StateStore(tmp_path).load()
        assert problems == {} and len(records) == 7
        assert not list((tmp_path / "functions").glob(".*.tmp"))


# ---------------------------------------------------------------------- function logs


def test_function_logs_are_tagged_rotated_and_read_back_in_order(tmp_path) -> None:
    logs = FunctionLogs(tmp_path / "logs", max_bytes=400, files=2)
    for i in range(30):
        logs.function_output("fn", f"fn#{100 + i % 2}", f"line {i:02d}")
    logs.event("fn", "deployed\nsecond line")
    names = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert names == ["fn.log", "fn.log.1", "fn.log.2"]  # older ones were dropped
    assert all(p.stat().st_size <= 400 for p in (tmp_path / "logs").iterdir())
    text, cursor = logs.tail("fn", 5)
    lines = text.splitlines()
    assert len(lines) == 5 and lines[-1].endswith("[hourai] second line")
    assert lines[-3].endswith("[fn#101] line 29")
    # a cursor survives rotation: what was written after it comes back, nothing twice
    for i in range(30, 60):
        logs.function_output("fn", "fn#7", f"line {i:02d}")
    got = ""
    while True:
        chunk, cursor = logs.read("fn", cursor, limit=150)
        if not chunk:
            break
        got += chunk
    numbers = [int(line.rsplit(" ", 1)[1]) for line in got.splitlines()]
    assert numbers == sorted(numbers) and numbers[-1] == 59
    assert len(numbers) == len(set(numbers))
    logs.remove("fn")
    assert not list((tmp_path / "logs").iterdir()) and logs.tail("fn", 5) == ("", "0:0")
    with pytest.raises(ValueError, match="bad cursor"):
        logs.read("fn", "nonsense")


def test_a_reader_waits_for_the_next_line(tmp_path) -> None:
    async def main() -> str:
        logs = FunctionLogs(tmp_path / "logs")
        _, cursor = logs.tail("fn", 10)
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, logs.function_output, "fn", "fn#1", "late")
        started = loop.time()
        await logs.wait("fn", 10)
        assert loop.time() - started < 5
        await logs.wait("fn", 0.01)  # nothing new: returns at the timeout
        return logs.read("fn", cursor)[0]

    assert asyncio.run(main()).endswith("[fn#1] late\n")


def test_a_line_written_between_a_read_and_the_wait_still_wakes_the_reader(tmp_path) -> None:
    # The follower reads (in a thread) and waits only if it found nothing; a line written
    # in between must not be missed until the wait's timeout.
    async def main() -> float:
        logs = FunctionLogs(tmp_path / "logs")
        _, cursor = logs.tail("fn", 10)
        watched = logs.watch("fn")
        assert logs.read("fn", cursor)[0] == ""  # nothing yet
        logs.function_output("fn", "fn#1", "meanwhile")  # written before the wait begins
        loop = asyncio.get_running_loop()
        started = loop.time()
        await logs.wait("fn", 30, watched)
        return loop.time() - started

    assert asyncio.run(main()) < 1


def test_a_log_that_cannot_be_written_costs_lines_not_the_daemon(tmp_path, caplog) -> None:
    logs = FunctionLogs(tmp_path / "logs")
    (tmp_path / "logs" / "fn.log").mkdir()  # any write error will do; EISDIR is easy to make
    logs.function_output("fn", "fn#1", "lost")
    logs.function_output("fn", "fn#1", "lost too")
    assert caplog.text.count("cannot write the log of fn") == 1  # said once, not per line
    (tmp_path / "logs" / "fn.log").rmdir()
    logs.function_output("fn", "fn#1", "kept")
    assert Path(tmp_path / "logs" / "fn.log").read_text().endswith("[fn#1] kept\n")
