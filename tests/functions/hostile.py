"""A tenant's function written to break out: each path is one attack, answered with what it got.

Used by test_hostile.py; every answer is JSON a test can assert on ("error" is the exception's
type name when the attack was refused).
"""

import errno
import json
import os
import signal
import subprocess
import time

if os.environ.get("HOSTILE_IMPORT_TAG"):
    # Module-level code that starts an escapee and then takes its time: the snapshot is
    # "mid-import" for as long as this sleeps.
    _LOOP = "trap '' TERM HUP; while :; do sleep 1; done # "
    subprocess.Popen(
        ["/bin/sh", "-c", _LOOP + os.environ["HOSTILE_IMPORT_TAG"]], start_new_session=True
    )
    time.sleep(float(os.environ.get("HOSTILE_IMPORT_SLEEP", "60")))


def _try(action):  # type: ignore[no-untyped-def]
    try:
        return action()
    except OSError as exc:
        return {"error": type(exc).__name__, "errno": errno.errorcode.get(exc.errno or 0, "")}


def _read(path: str) -> dict:  # type: ignore[type-arg]
    with open(path, "rb") as f:
        return {"read": f.read(1 << 16).decode("utf-8", "replace")}


def _write(path: str, text: str) -> dict:  # type: ignore[type-arg]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return {"written": path}


def _processes() -> dict:  # type: ignore[type-arg]
    seen = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    seen[entry] = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError as exc:
                seen[entry] = type(exc).__name__
    return {"processes": seen}


def _escape(tag: str) -> dict:  # type: ignore[type-arg]
    """setsid + double fork: the grandchild leaves our process group and session, drops the
    death signal, ignores SIGTERM and runs on (as a shell, so its command line carries the
    tag the test looks for)."""
    pid = os.fork()
    if pid == 0:
        os.setsid()
        if os.fork() == 0:
            import ctypes

            ctypes.CDLL(None).prctl(1, 0, 0, 0, 0)  # PR_SET_PDEATHSIG: none
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            loop = f"trap '' TERM HUP; while :; do sleep 1; done # {tag}"
            os.execv("/bin/sh", ["/bin/sh", "-c", loop])
        os._exit(0)
    os.waitpid(pid, 0)
    return {"escaped": tag}


def _fill(path: str) -> dict:  # type: ignore[type-arg]
    written = 0
    block = b"x" * (1 << 20)
    try:
        with open(path, "wb") as f:
            while written < (4 << 30):
                f.write(block)
                f.flush()
                written += len(block)
    except OSError as exc:
        return {"written": written, "error": errno.errorcode.get(exc.errno or 0, "")}
    return {"written": written}


def _mark(dirs: list[str], tag: str) -> dict:  # type: ignore[type-arg]
    """Try to leave a file in each directory; which ones took it."""
    took = []
    for d in dirs:
        try:
            with open(os.path.join(d, f"hostile-{tag}"), "w") as f:
                f.write(tag)
            took.append(d)
        except OSError:
            pass
    return {"took": took}


def handler(event, context):  # type: ignore[no-untyped-def]
    path = "/" + event["rawPath"].rsplit("/", 1)[-1]
    q = event.get("queryStringParameters") or {}
    body = json.loads(event.get("body") or "{}")
    if path == "/whoami":
        return {
            "pid": os.getpid(),
            "pidns": os.stat("/proc/self/ns/pid").st_ino,
            "uid": os.getuid(),
            "env": dict(os.environ),
            "cwd": os.getcwd(),
        }
    if path == "/read":
        return _try(lambda: _read(q["path"]))
    if path == "/readall":  # many paths at once: {"paths": [...]} -> the ones that opened
        opened = [p for p in body["paths"] if "read" in _try(lambda p=p: _read(p))]
        return {"opened": opened}
    if path == "/list":
        return _try(lambda: {"entries": sorted(os.listdir(q["path"]))})
    if path == "/write":
        return _try(lambda: _write(q["path"], q.get("text", "x")))
    if path == "/processes":
        return _processes()
    if path == "/signal":
        return _try(lambda: os.kill(int(q["pid"]), int(q.get("sig", "0"))) or {"signalled": True})
    if path == "/escape":
        return _escape(q["tag"])
    if path == "/fill":
        return _fill(q.get("path", "/tmp/fill"))
    if path == "/mark":
        return _mark(body["dirs"], q["tag"])
    if path == "/die":
        os._exit(3)
    return "ok"
