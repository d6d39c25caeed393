"""`hourai debug` for real: a minimal DAP client attaches to the worker's debugpy over TCP,
sets a breakpoint in the user's own file, and a real HTTP request stops there."""

from __future__ import annotations

import json
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Reply, request, wait_until

pytest.importorskip("debugpy")

FUNCTION = """\
import os


def handler(event, context):
    answer = {"pid": os.getpid(), "path": event["rawPath"]}
    return answer  # BREAK
"""


class Dap:
    """Just enough of the Debug Adapter Protocol: framed JSON both ways."""

    def __init__(self, port: int) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.buf = b""
        self.seq = 0
        self.messages: list[dict[str, Any]] = []

    def send(self, command: str, **arguments: Any) -> int:
        self.seq += 1
        body = json.dumps(
            {"seq": self.seq, "type": "request", "command": command, "arguments": arguments}
        ).encode()
        self.sock.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return self.seq

    def _read_one(self) -> dict[str, Any]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if b"Content-Length" in line
        )
        while len(rest) < length:
            self.buf = head + b"\r\n\r\n" + rest
            self._fill()
            head, _, rest = self.buf.partition(b"\r\n\r\n")
        self.buf = rest[length:]
        return json.loads(rest[:length])

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the debug adapter closed the connection")
        self.buf += data

    def wait(self, pred: Any, timeout: float = 30.0) -> dict[str, Any]:
        for msg in self.messages:
            if pred(msg):
                self.messages.remove(msg)
                return msg
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self._read_one()
            if pred(msg):
                return msg
            self.messages.append(msg)
        raise TimeoutError("no such DAP message")

    def response(self, seq: int) -> dict[str, Any]:
        msg = self.wait(lambda m: m.get("type") == "response" and m.get("request_seq") == seq)
        assert msg["success"], msg
        return msg

    def event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait(lambda m: m.get("type") == "event" and m.get("event") == name, timeout)

    def close(self) -> None:
        self.sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_at_breakpoint(
    port: int, source: Path, mapping: dict[str, str], get: Any, hold: float = 0.0
) -> Reply:
    """Attach, break in the user's ``source``, send a request through ``get``, see it stop
    there (held ``hold`` seconds), continue, detach; the request's answer."""
    dap = Dap(port)
    try:
        dap.response(
            dap.send(
                "initialize",
                clientID="test",
                adapterID="python",
                pathFormat="path",
                linesStartAt1=True,
                columnsStartAt1=True,
            )
        )
        attach = dap.send("attach", justMyCode=True, pathMappings=[mapping])
        dap.event("initialized")
        line = FUNCTION.splitlines().index("    return answer  # BREAK") + 1
        set_bp = dap.response(
            dap.send("setBreakpoints", source={"path": str(source)}, breakpoints=[{"line": line}])
        )
        assert set_bp["body"]["breakpoints"][0]["verified"], set_bp
        dap.response(dap.send("configurationDone"))
        dap.response(attach)

        answer: list[Reply] = []
        caller = threading.Thread(target=lambda: answer.append(get("/stop")))
        caller.start()
        stopped = dap.event("stopped")
        assert stopped["body"]["reason"] == "breakpoint"
        thread_id = stopped["body"]["threadId"]
        frames = dap.response(dap.send("stackTrace", threadId=thread_id, levels=1))["body"]
        top = frames["stackFrames"][0]
        # the user's own file, at the line they set it on
        assert top["source"]["path"] == str(source) and top["line"] == line
        time.sleep(hold)
        assert not answer
        dap.response(dap.send("continue", threadId=thread_id))
        caller.join(30)
        assert answer and answer[0].status == 200
        dap.send("disconnect", terminateDebuggee=False)
        return answer[0]
    finally:
        dap.close()


@pytest.mark.slow
@pytest.mark.parametrize("concurrency", [1, 2], ids=["process", "thread"])
def test_a_debugger_stops_a_real_request_at_a_breakpoint_in_the_users_file(
    hourai_daemon, concurrency: int
) -> None:
    d = hourai_daemon(f"[defaults]\nspares = 0\ntimeout = 2\nconcurrency = {concurrency}\n")
    fn = Path(hourai_daemon.root) / "dbg"
    fn.mkdir()
    fn.chmod(0o755)
    source = fn / "handler.py"
    source.write_text(FUNCTION)
    source.chmod(0o644)
    d.cli("deploy", "dbg", str(source))
    before = d.get("/dbg/x").json()["pid"]  # type: ignore[index]

    port = _free_port()
    opened = json.loads(d.cli("debug", "dbg", "--port", str(port), "--json").stdout)
    assert opened["port"] == port and opened["host"] == "127.0.0.1"
    assert opened["source_root"] == str(fn) and opened["code_root"] != str(fn)
    text = d.cli("debug", "dbg", "--port", str(port), check=False)
    assert text.returncode == 1 and "already has a debug session" in text.stderr

    mapping = {"localRoot": opened["source_root"], "remoteRoot": opened["code_root"]}
    # held past the function's 2 s timeout: the timeout is suspended for this worker
    reply = _stop_at_breakpoint(
        port, source, mapping, lambda path: d.get(f"/dbg{path}", timeout=60), hold=2.5
    )
    debugged = reply.json()["pid"]  # type: ignore[index]
    assert debugged != before  # a fresh worker, not the one that served before
    assert reply.start == "debug"

    # detached: the worker is retired, requests go to the scheduler's workers again
    def served_elsewhere() -> bool:
        reply = d.get("/dbg/after")
        return reply.status == 200 and reply.json()["pid"] != debugged  # type: ignore[index]

    wait_until(served_elsewhere, timeout=15)  # the worker leaves within 0.1 s of the detach
    wait_until(lambda: "debug session ended" in "\n".join(d.lines), timeout=10)
    again = d.cli("debug", "dbg", "--stop", check=False)
    assert again.returncode == 1 and "has no debug session" in again.stderr


def test_debug_needs_a_deployed_function(hourai_daemon) -> None:
    d = hourai_daemon()
    result = d.cli("debug", "nope", check=False)
    assert result.returncode == 1 and "nope" in result.stderr


@pytest.mark.slow
def test_hourai_run_debug_serves_from_a_debugger_worker_again_after_each_detach(
    hourai_run,
) -> None:
    fn = Path(tempfile.mkdtemp(prefix="hourai-dbg-"))
    try:
        fn.chmod(0o755)
        source = fn / "handler.py"
        source.write_text(FUNCTION)
        source.chmod(0o644)
        port = _free_port()
        proc = hourai_run(str(source), "--spares", "0", "--debug", "--debug-port", str(port))
        proc.wait_for(rf"debugpy listens on 127.0.0.1:{port}")
        remote = proc.wait_for(r'"remoteRoot": "([^"]+)"').group(1)
        local = proc.wait_for(r'"localRoot": "([^"]+)"').group(1)
        assert local == str(fn)
        mapping = {"localRoot": local, "remoteRoot": remote}
        get = lambda path: request(proc.port, path, timeout=60)  # noqa: E731
        first = _stop_at_breakpoint(port, source, mapping, get)
        assert first.start == "debug"
        # detached: a new debugger worker is up for the next attach
        wait_until(
            lambda: len(re.findall(rf"listens on 127.0.0.1:{port}", "\n".join(proc.lines))) >= 2,
            timeout=20,
        )
        second = _stop_at_breakpoint(port, source, mapping, get)
        assert second.json()["pid"] != first.json()["pid"]  # type: ignore[index]
    finally:
        shutil.rmtree(fn, ignore_errors=True)
