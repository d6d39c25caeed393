"""The control API's HTTP/JSON layer on a real unix socket, its client, and its validation.

The operations behind the socket here are a small in-memory stand-in for the daemon, so
every route, status and failure mode can be driven directly; tests/test_daemon.py runs the
same API against real daemons.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hourai.client import ApiFailure, Client, ClientError
from hourai.control import ApiError, ControlAPI, ControlServer, SocketInUse
from hourai.service import _deploy_body, _invocation


class Ops:
    """Records calls; raises what it is told to."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail: BaseException | None = None

    def _call(self, *args: Any) -> dict[str, Any]:
        self.calls.append(args)
        if self.fail is not None:
            raise self.fail
        return {"ok": args[0]}

    def health(self) -> tuple[bool, dict[str, Any]]:
        return True, {"status": "ready"}

    async def render_metrics(self) -> tuple[bytes, str]:
        return b"hourai_up 1\n", "text/plain; version=0.0.4"

    def list_functions(self) -> dict[str, Any]:
        return self._call("ls")

    def show(self, name: str) -> dict[str, Any]:
        return self._call("show", name)

    async def deploy(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("deploy", name, body)

    async def remove(self, name: str) -> dict[str, Any]:
        return self._call("rm", name)

    async def rollback(self, name: str, version: str | None) -> dict[str, Any]:
        return self._call("rollback", name, version)

    async def invoke(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("invoke", name, body)

    async def logs(
        self, name: str, lines: int | None, cursor: str | None, wait: float
    ) -> dict[str, Any]:
        return self._call("logs", name, lines, cursor, wait)

    async def stats(self) -> dict[str, Any]:
        return self._call("stats")

    async def reload(self) -> dict[str, Any]:
        return self._call("reload")


class Served:
    """A ControlServer on its own event loop thread."""

    def __init__(self, path: Path, group: str = "") -> None:
        self.ops = Ops()
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.server = ControlServer(ControlAPI(self.ops).handle, path)
        ready = threading.Event()
        self.error: BaseException | None = None

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(self.server.start(group))
            except BaseException as exc:
                self.error = exc
                ready.set()
                return
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)
        if self.error is not None:
            raise self.error
        self.client = Client(path)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def served(tmp_path) -> Iterator[Served]:
    s = Served(tmp_path / "c.sock")
    yield s
    s.close()


def test_routes_reach_the_operations(served: Served) -> None:
    c = served.client
    assert c.functions() == {"ok": "ls"}
    c.show("hello")
    c.deploy("hello", "app.py", "/work", {"timeout": 3})
    c.remove("hello")
    c.rollback("hello", None)
    c.rollback("hello", "abc")
    c.invoke("hello", {"path": "/x"})
    c.logs("hello", lines=5)
    c.logs("hello", cursor="12:34", wait=2)
    c.stats()
    c.call("POST", "/v1/reload")
    assert served.ops.calls == [
        ("ls",),
        ("show", "hello"),
        ("deploy", "hello", {"path": "app.py", "cwd": "/work", "options": {"timeout": 3}}),
        ("rm", "hello"),
        ("rollback", "hello", None),
        ("rollback", "hello", "abc"),
        ("invoke", "hello", {"path": "/x"}),
        ("logs", "hello", 5, None, 0.0),
        ("logs", "hello", None, "12:34", 2.0),
        ("stats",),
        ("reload",),
    ]
    assert c.health() == (200, {"status": "ready"})
    assert c.metrics() == "hourai_up 1\n"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("GET", "/nowhere", None, 404, "no such endpoint: /nowhere"),
        ("POST", "/v1/functions", None, 405, "POST is not allowed on /v1/functions (use GET)"),
        ("PATCH", "/v1/functions/x", None, 405, "use DELETE, GET, PUT"),
        ("PUT", "/v1/functions/x", b"", 400, "needs a JSON object as its body"),
        ("PUT", "/v1/functions/x", b"{oops", 400, "the body is not valid JSON"),
        ("PUT", "/v1/functions/x", b'"text"', 400, "the body must be a JSON object"),
        ("POST", "/v1/functions/x/rollback", b'{"version": 5}', 400, "version must be a string"),
        ("GET", "/v1/functions/x/logs?lines=many", None, 400, "lines must be an integer"),
        ("GET", "/v1/functions/x/logs?wait=soon", None, 400, "wait must be a number"),
    ],
)
def test_bad_requests_get_a_json_4xx(served: Served, method, path, body, status, message) -> None:
    got, ctype, data = served.client.raw(method, path, data=body)
    assert got == status and ctype == "application/json"
    assert message in json.loads(data)["error"]
    assert served.ops.calls == []


def test_operation_errors_become_statuses_and_crashes_a_500(served: Served) -> None:
    served.ops.fail = ApiError(422, "refused: SyntaxError", details="Traceback ...", serving="v1")
    with pytest.raises(ApiFailure) as exc:
        served.client.deploy("x", "app.py", "/", {})
    assert exc.value.status == 422
    assert exc.value.doc == {
        "error": "refused: SyntaxError",
        "details": "Traceback ...",
        "serving": "v1",
    }
    served.ops.fail = RuntimeError("a bug")
    status, _, data = served.client.raw("GET", "/v1/functions")
    assert status == 500 and "internal error" in json.loads(data)["error"]
    served.ops.fail = None
    assert served.client.functions() == {"ok": "ls"}  # still serving


def test_the_socket_is_born_private(served: Served) -> None:
    mode = served.path.stat().st_mode
    assert stat.S_ISSOCK(mode) and mode & 0o777 == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to a group needs root")
def test_a_socket_group_gets_read_write(tmp_path) -> None:
    s = Served(tmp_path / "g.sock", group="root")
    try:
        st_ = s.path.stat()
        assert st_.st_mode & 0o777 == 0o660 and st_.st_gid == 0
    finally:
        s.close()


def test_a_stale_socket_is_replaced_a_live_one_is_not(tmp_path) -> None:
    path = tmp_path / "c.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # bound, never listened: what a crashed daemon leaves
    s = Served(path)
    try:
        assert s.client.functions() == {"ok": "ls"}
        with pytest.raises(SocketInUse, match="another hourai daemon is answering"):
            Served(path)
    finally:
        s.close()
    assert not path.exists()  # removed at close
    path.write_text("not a socket")
    with pytest.raises(SocketInUse, match="is not a socket"):
        Served(path)
    assert path.read_text() == "not a socket"


def test_the_client_says_what_is_wrong_without_a_daemon(tmp_path) -> None:
    with pytest.raises(ClientError, match="the socket does not exist"):
        Client(tmp_path / "none.sock").functions()
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(tmp_path / "dead.sock"))
    try:
        with pytest.raises(ClientError, match="nothing listens there"):
            Client(tmp_path / "dead.sock").functions()
    finally:
        dead.close()


# ---------------------------------------------------------------------- validation


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
_keys = st.sampled_from(
    ["path", "cwd", "options", "method", "query", "headers", "body", "base64", "event", "x"]
)


@given(st.dictionaries(_keys, _json, max_size=6))
@settings(max_examples=200)
def test_any_deploy_body_is_accepted_or_a_400(body: dict[str, Any]) -> None:
    try:
        path, cwd, options = _deploy_body(body)
        assert cwd is None or cwd.startswith("/")
    except ApiError as exc:
        assert exc.status == 400
    else:
        assert isinstance(path, str) and isinstance(options, dict)


@given(st.dictionaries(_keys, _json, max_size=6))
@settings(max_examples=200)
def test_any_invoke_body_is_a_request_or_a_400(body: dict[str, Any]) -> None:
    try:
        request = _invocation(body)
    except ApiError as exc:
        assert exc.status == 400
    else:
        assert request.path.startswith("/") and isinstance(request.body, bytes)
        assert all("\n" not in k + v for k, v in request.headers)


def test_an_api_gateway_event_becomes_the_request_it_describes() -> None:
    event = {
        "version": "2.0",
        "rawPath": "/orders/7",
        "rawQueryString": "full=1",
        "headers": {"X-Trace": "abc"},
        "requestContext": {"http": {"method": "PUT", "path": "/orders/7"}},
        "body": "eyJhIjogMX0=",
        "isBase64Encoded": True,
    }
    request = _invocation({"event": event})
    assert (request.method, request.path, request.query) == ("PUT", "/orders/7", "full=1")
    assert request.body == b'{"a": 1}' and ("x-trace", "abc") in request.headers
