"""Invokers driving real Flask and FastAPI apps, bare WSGI/ASGI callables and Lambda handlers.

Everything runs in-process, except one test that forks after the ASGI lifespan startup to show
that the snapshot -> worker split works: startup in the parent, after_fork + invoke in the child.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hourai.isolate.adapters import (
    AsgiInvoker,
    HandlerInvoker,
    Invoker,
    StartupError,
    WsgiInvoker,
    build_environ,
    build_scope,
)
from hourai.isolate.loader import load, resolve_target

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def _restore_sys_path() -> Iterator[None]:
    # load() puts the function's directory first on sys.path; keep other tests unaffected.
    saved = list(sys.path)
    yield
    sys.path[:] = saved


def make_inv(
    method: str = "GET",
    path: str = "/",
    query: str = "",
    headers: list[list[str]] | None = None,
    body: bytes = b"",
    root_path: str = "",
    **extra: Any,
) -> dict[str, Any]:
    inv: dict[str, Any] = {
        "id": 1,
        "method": method,
        "path": path,
        "root_path": root_path,
        "query": query,
        "headers": [["host", "localhost:8080"], *(headers or [])],
        "body": body,
        "client": ["127.0.0.1", 51000],
        "server": ["127.0.0.1", 8080],
        "scheme": "http",
        "http_version": "1.1",
        "request_id": "req-42",
        "function": "fn",
        "deadline_ms": 10_000,
        "stage": "$default",
    }
    inv.update(extra)
    return inv


def header(response: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in response["headers"] if k.lower() == name]


def body_json(response: dict[str, Any]) -> Any:
    return json.loads(response["body"])


def load_file(tmp_path: Path, source: str, name: str = "fn.py", **kwargs: Any) -> Invoker:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return load(resolve_target(str(path)), **kwargs)


# -- Lambda-style handlers ----------------------------------------------------------------------


def test_hello_example_handler() -> None:
    invoker = load(resolve_target(str(EXAMPLES / "hello" / "handler.py")))
    assert isinstance(invoker, HandlerInvoker)
    assert (invoker.kind, invoker.attr, invoker.is_async) == ("handler", "handler", False)
    invoker.startup()
    response = invoker.invoke(make_inv(path="/greet", query="name=Ada"))
    assert response["status"] == 200
    assert body_json(response) == {
        "message": "Hello, Ada!",
        "path": "/greet",
        "request_id": "req-42",
    }


def test_handler_receives_event_and_context(tmp_path: Path) -> None:
    invoker = load_file(
        tmp_path,
        """
        def handler(event, context):
            return {
                "event": event,
                "function_name": context.function_name,
                "request_id": context.aws_request_id,
                "memory": context.memory_limit_in_mb,
                "remaining": context.get_remaining_time_in_millis(),
            }
        """,
        memory_limit_mb=512,
    )
    response = invoker.invoke(
        make_inv(method="POST", path="/a%20b", root_path="/fn", body=b'{"x": 1}', query="q=1")
    )
    assert response["status"] == 200
    assert header(response, "content-type") == ["application/json"]
    out = body_json(response)
    assert out["event"]["rawPath"] == "/fn/a%20b"
    assert out["event"]["requestContext"]["http"]["path"] == "/fn/a b"
    assert out["event"]["body"] == '{"x": 1}'
    assert out["event"]["queryStringParameters"] == {"q": "1"}
    assert (out["function_name"], out["request_id"], out["memory"]) == ("fn", "req-42", "512")
    assert 9000 < out["remaining"] <= 10_000


def test_handler_taking_only_the_event(tmp_path: Path) -> None:
    invoker = load_file(tmp_path, "def lambda_handler(event):\n    return event['rawPath']\n")
    assert invoker.attr == "lambda_handler"
    assert invoker.invoke(make_inv(path="/only-event"))["body"] == b"/only-event"


def test_async_handler_in_process_mode_and_after_fork_loop(tmp_path: Path) -> None:
    invoker = load_file(
        tmp_path,
        """
        import asyncio

        async def handler(event, context):
            await asyncio.sleep(0)
            return {"statusCode": 202, "body": "async " + event["rawPath"]}
        """,
    )
    assert invoker.is_async
    first = invoker.invoke(make_inv(path="/one"))
    assert (first["status"], first["body"]) == (202, b"async /one")
    assert isinstance(invoker, HandlerInvoker)
    old_loop = invoker.loop
    invoker.after_fork()
    assert invoker.loop is not old_loop
    assert invoker.invoke(make_inv(path="/two"))["body"] == b"async /two"


def test_async_handlers_run_concurrently_with_invoke_async(tmp_path: Path) -> None:
    # Each invocation waits until both have started: sequential execution would time out.
    invoker = load_file(
        tmp_path,
        """
        import asyncio

        started = []
        both = None

        async def handler(event, context):
            global both
            both = both or asyncio.Event()
            started.append(event["rawPath"])
            if len(started) == 2:
                both.set()
            await asyncio.wait_for(both.wait(), 5)
            return event["rawPath"]
        """,
    )

    async def main() -> list[dict[str, Any]]:
        return await asyncio.gather(
            invoker.invoke_async(make_inv(path="/a")), invoker.invoke_async(make_inv(path="/b"))
        )

    results = asyncio.run(main())
    assert [r["body"] for r in results] == [b"/a", b"/b"]


def test_sync_handler_via_invoke_async_does_not_block_the_loop(tmp_path: Path) -> None:
    invoker = load_file(
        tmp_path,
        """
        import threading
        def handler(event, context):
            return threading.current_thread().name
        """,
    )

    async def main() -> dict[str, Any]:
        return await invoker.invoke_async(make_inv())

    assert asyncio.run(main())["body"] != b"MainThread"


def test_handler_exception_propagates(tmp_path: Path) -> None:
    invoker = load_file(tmp_path, "def handler(event, context):\n    raise KeyError('nope')\n")
    with pytest.raises(KeyError, match="nope"):
        invoker.invoke(make_inv())


def test_handler_head_response_has_headers_but_no_body(tmp_path: Path) -> None:
    invoker = load_file(
        tmp_path,
        """
        def handler(event, context):
            method = event["requestContext"]["http"]["method"]
            return {"statusCode": 200, "headers": {"x-m": method}, "body": "full body"}
        """,
    )
    response = invoker.invoke(make_inv(method="HEAD"))
    assert (response["status"], response["body"]) == (200, b"")
    assert header(response, "x-m") == ["HEAD"]


def test_handler_base64_request_and_response(tmp_path: Path) -> None:
    invoker = load_file(
        tmp_path,
        """
        import base64
        def handler(event, context):
            assert event["isBase64Encoded"]
            data = base64.b64decode(event["body"])
            return {"statusCode": 200, "isBase64Encoded": True,
                    "headers": {"content-type": "application/octet-stream"},
                    "body": base64.b64encode(data[::-1]).decode()}
        """,
    )
    blob = bytes(range(256))
    response = invoker.invoke(
        make_inv(method="PUT", body=blob, headers=[["content-type", "application/octet-stream"]])
    )
    assert response["body"] == blob[::-1]


def test_handler_cookies_round_trip(tmp_path: Path) -> None:
    invoker = load_file(
        tmp_path,
        """
        def handler(event, context):
            return {"statusCode": 200, "body": ";".join(event["cookies"]),
                    "cookies": ["a=1; Path=/", "b=2; HttpOnly"]}
        """,
    )
    response = invoker.invoke(make_inv(headers=[["cookie", "x=1; y=2"]]))
    assert response["body"] == b"x=1;y=2"
    assert header(response, "set-cookie") == ["a=1; Path=/", "b=2; HttpOnly"]


# -- WSGI: the Flask example --------------------------------------------------------------------


@pytest.fixture(scope="module")
def flask_app() -> Invoker:
    invoker = load(resolve_target(str(EXAMPLES / "flask_app")))
    invoker.startup()
    return invoker


def test_flask_is_detected_as_wsgi(flask_app: Invoker) -> None:
    assert isinstance(flask_app, WsgiInvoker)
    assert (flask_app.kind, flask_app.attr, flask_app.is_async) == ("wsgi", "app", False)


def test_flask_route_and_json(flask_app: Invoker) -> None:
    response = flask_app.invoke(make_inv(path="/"))
    assert (response["status"], response["body"]) == (200, b"Hello from Flask!\n")
    response = flask_app.invoke(make_inv(path="/items/2"))
    assert response["status"] == 200
    assert header(response, "content-type") == ["application/json"]
    assert body_json(response) == {"id": 2, "name": "banana"}


def test_flask_percent_encoded_path(flask_app: Invoker) -> None:
    response = flask_app.invoke(make_inv(path="/items/%31"))
    assert body_json(response) == {"id": 1, "name": "apple"}


def test_flask_query_args(flask_app: Invoker) -> None:
    response = flask_app.invoke(make_inv(path="/search", query="q=caf%C3%A9+au+lait&tag=a&tag=b"))
    assert body_json(response) == {"q": "café au lait", "tags": ["a", "b"]}


def test_flask_form_post(flask_app: Invoker) -> None:
    response = flask_app.invoke(
        make_inv(
            method="POST",
            path="/form",
            headers=[["content-type", "application/x-www-form-urlencoded"]],
            body=b"name=Ada+Lovelace&colour=red&colour=blue",
        )
    )
    assert response["status"] == 200
    assert body_json(response) == {"name": "Ada Lovelace", "colours": ["red", "blue"]}


def test_flask_json_post(flask_app: Invoker) -> None:
    response = flask_app.invoke(
        make_inv(
            method="POST",
            path="/json",
            headers=[["content-type", "application/json"]],
            body=b'{"a": [1, 2]}',
        )
    )
    assert response["status"] == 201
    assert body_json(response) == {"received": {"a": [1, 2]}}


def test_flask_404s(flask_app: Invoker) -> None:
    assert flask_app.invoke(make_inv(path="/no/such/route"))["status"] == 404
    response = flask_app.invoke(make_inv(path="/items/99"))
    assert (response["status"], body_json(response)) == (404, {"error": "no item 99"})


def test_flask_sees_the_mount_point(flask_app: Invoker) -> None:
    response = flask_app.invoke(make_inv(path="/where", root_path="/myfn", query="x=1"))
    assert body_json(response) == {
        "script_root": "/myfn",
        "path": "/where",
        "url": "http://localhost:8080/myfn/where?x=1",
        "host": "localhost:8080",
    }


def test_flask_cookies(flask_app: Invoker) -> None:
    response = flask_app.invoke(make_inv(path="/cookie", headers=[["cookie", "session=abc"]]))
    assert body_json(response) == {"seen": "abc"}
    assert header(response, "set-cookie") == ["visited=yes; Path=/"]


def test_flask_head_keeps_headers_drops_body(flask_app: Invoker) -> None:
    get = flask_app.invoke(make_inv(path="/items/1"))
    head = flask_app.invoke(make_inv(method="HEAD", path="/items/1"))
    assert head["status"] == 200
    assert head["body"] == b""
    assert header(head, "content-length") == [str(len(get["body"]))]


def test_flask_error_propagates(flask_app: Invoker) -> None:
    with pytest.raises(RuntimeError, match="boom from Flask"):
        flask_app.invoke(make_inv(path="/boom"))


def test_flask_in_thread_mode_via_invoke_async(flask_app: Invoker) -> None:
    async def main() -> list[dict[str, Any]]:
        return await asyncio.gather(
            *(flask_app.invoke_async(make_inv(path=f"/items/{i}")) for i in (1, 2))
        )

    assert [body_json(r)["name"] for r in asyncio.run(main())] == ["apple", "banana"]


def test_plain_wsgi_example() -> None:
    invoker = load(resolve_target(str(EXAMPLES / "wsgi_plain" / "app.py")))
    assert (invoker.kind, invoker.attr) == ("wsgi", "application")
    response = invoker.invoke(make_inv(method="POST", path="/x%2Fy", query="a=1", body=b"12345"))
    assert response["body"] == b"POST /x/y?a=1 (5 bytes)\n"


# -- WSGI: environ and start_response semantics ------------------------------------------------


def test_environ_follows_pep_3333() -> None:
    environ = build_environ(
        make_inv(
            method="POST",
            path="/caf%C3%A9/x%20y",
            root_path="/mount",
            query="a=1&b=%20",
            headers=[
                ["content-type", "text/plain"],
                ["content-length", "5"],
                ["x-multi", "a"],
                ["x-multi", "b"],
                ["cookie", "a=1"],
                ["cookie", "b=2"],
                ["x_forwarded_for", "spoofed"],
            ],
            body=b"hello",
        ),
        multithread=True,
    )
    assert environ["REQUEST_METHOD"] == "POST"
    assert environ["SCRIPT_NAME"] == "/mount"
    # The UTF-8 bytes of "é", each carried as one latin-1 character.
    assert environ["PATH_INFO"] == "/caf\xc3\xa9/x y"
    assert environ["PATH_INFO"].encode("latin-1").decode("utf-8") == "/café/x y"
    assert environ["QUERY_STRING"] == "a=1&b=%20"
    assert environ["CONTENT_TYPE"] == "text/plain"
    assert environ["CONTENT_LENGTH"] == "5"
    assert "HTTP_CONTENT_TYPE" not in environ and "HTTP_CONTENT_LENGTH" not in environ
    assert environ["HTTP_HOST"] == "localhost:8080"
    assert environ["HTTP_X_MULTI"] == "a,b"
    assert environ["HTTP_COOKIE"] == "a=1; b=2"
    assert "HTTP_X_FORWARDED_FOR" not in environ
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("127.0.0.1", "8080")
    assert (environ["REMOTE_ADDR"], environ["REMOTE_PORT"]) == ("127.0.0.1", "51000")
    assert environ["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert environ["wsgi.version"] == (1, 0)
    assert environ["wsgi.url_scheme"] == "http"
    assert environ["wsgi.input"].read() == b"hello"
    assert environ["wsgi.errors"] is sys.stderr
    assert environ["wsgi.multithread"] is True
    assert environ["wsgi.multiprocess"] is True
    assert environ["wsgi.run_once"] is False
    assert all(isinstance(v, str) for k, v in environ.items() if k.isupper())


def test_environ_without_body_has_no_content_length() -> None:
    environ = build_environ(make_inv())
    assert "CONTENT_LENGTH" not in environ
    assert environ["wsgi.multithread"] is False


def _wsgi(app: Any) -> WsgiInvoker:
    return WsgiInvoker(app, "app")


def test_start_response_with_exc_info_before_the_body_replaces_the_response() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("x-first", "1")])
        try:
            raise ValueError("late failure")
        except ValueError:
            start_response("500 Internal Server Error", [("x-error", "1")], sys.exc_info())
        return [b"error page"]

    response = _wsgi(app).invoke(make_inv())
    assert response == {"status": 500, "headers": [["x-error", "1"]], "body": b"error page"}


def test_start_response_with_exc_info_after_the_body_reraises() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"partial"
        try:
            raise ValueError("too late")
        except ValueError:
            start_response("500 Internal Server Error", [], sys.exc_info())
        yield b"never"

    with pytest.raises(ValueError, match="too late"):
        _wsgi(app).invoke(make_inv())


def test_start_response_twice_without_exc_info_is_an_error() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        start_response("201 Created", [])
        return []

    with pytest.raises(RuntimeError, match="twice"):
        _wsgi(app).invoke(make_inv())


def test_write_callable_and_close_are_honoured() -> None:
    closed: list[bool] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            yield b" and "
            yield b"iterable"

        def close(self) -> None:
            closed.append(True)

    def app(environ: dict[str, Any], start_response: Any) -> Body:
        write = start_response("203 Non-Authoritative Information", [("a", "b")])
        write(b"written")
        return Body()

    response = _wsgi(app).invoke(make_inv())
    assert response == {"status": 203, "headers": [["a", "b"]], "body": b"written and iterable"}
    assert closed == [True]


def test_close_is_called_when_iteration_fails() -> None:
    closed: list[bool] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            yield b"x"
            raise OSError("disk gone")

        def close(self) -> None:
            closed.append(True)

    def app(environ: dict[str, Any], start_response: Any) -> Body:
        start_response("200 OK", [])
        return Body()

    with pytest.raises(OSError, match="disk gone"):
        _wsgi(app).invoke(make_inv())
    assert closed == [True]


def test_generator_app_may_call_start_response_lazily() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        yield b""  # PEP 3333: empty chunks before start_response are allowed
        start_response("200 OK", [("x-lazy", "1")])
        yield b"late start"

    response = _wsgi(app).invoke(make_inv())
    assert response == {"status": 200, "headers": [["x-lazy", "1"]], "body": b"late start"}


def test_app_that_never_calls_start_response_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="start_response"):
        _wsgi(lambda environ, start_response: []).invoke(make_inv())


# -- ASGI: the FastAPI example ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fastapi_app() -> Iterator[AsgiInvoker]:
    invoker = load(resolve_target(str(EXAMPLES / "fastapi_app" / "app.py")))
    assert isinstance(invoker, AsgiInvoker)
    invoker.startup()
    yield invoker
    invoker.shutdown()


def test_fastapi_is_detected_as_asgi(fastapi_app: AsgiInvoker) -> None:
    assert (fastapi_app.kind, fastapi_app.attr, fastapi_app.is_async) == ("asgi", "app", True)


def test_fastapi_lifespan_state_is_visible_in_requests(fastapi_app: AsgiInvoker) -> None:
    response = fastapi_app.invoke(make_inv(path="/"))
    assert response["status"] == 200
    assert body_json(response) == {"message": "Hello from FastAPI", "started_in": os.getpid()}


def test_fastapi_path_and_query_params(fastapi_app: AsgiInvoker) -> None:
    response = fastapi_app.invoke(make_inv(path="/items/5", query="verbose=true"))
    assert body_json(response) == {"item_id": 5, "verbose": True}
    response = fastapi_app.invoke(make_inv(path="/prices/%61pple"))
    assert body_json(response) == {"name": "apple", "price": 3}


def test_fastapi_json_body(fastapi_app: AsgiInvoker) -> None:
    response = fastapi_app.invoke(
        make_inv(
            method="POST",
            path="/items",
            headers=[["content-type", "application/json"]],
            body=b'{"name": "apple", "price": 2.5, "tags": ["fruit"]}',
        )
    )
    assert response["status"] == 201
    assert body_json(response) == {
        "item": {"name": "apple", "price": 2.5, "tags": ["fruit"]},
        "known_price": 3,
    }


def test_fastapi_validation_errors_are_422(fastapi_app: AsgiInvoker) -> None:
    assert fastapi_app.invoke(make_inv(path="/items/abc"))["status"] == 422
    response = fastapi_app.invoke(
        make_inv(
            method="POST",
            path="/items",
            headers=[["content-type", "application/json"]],
            body=b'{"name": "apple"}',
        )
    )
    assert response["status"] == 422
    assert body_json(response)["detail"][0]["loc"] == ["body", "price"]


def test_fastapi_404s(fastapi_app: AsgiInvoker) -> None:
    assert fastapi_app.invoke(make_inv(path="/nowhere"))["status"] == 404
    response = fastapi_app.invoke(make_inv(path="/prices/pear"))
    assert (response["status"], body_json(response)) == (404, {"detail": "no price for pear"})


def test_fastapi_sees_the_mount_point(fastapi_app: AsgiInvoker) -> None:
    response = fastapi_app.invoke(make_inv(path="/where", root_path="/myfn"))
    assert response["status"] == 200
    assert body_json(response) == {"root_path": "/myfn", "path": "/myfn/where", "pid": os.getpid()}


def test_fastapi_streaming_response_is_collected_whole(fastapi_app: AsgiInvoker) -> None:
    response = fastapi_app.invoke(make_inv(path="/stream"))
    assert (response["status"], response["body"]) == (200, b"0\n1\n2\n")


def test_fastapi_error_propagates(fastapi_app: AsgiInvoker) -> None:
    with pytest.raises(RuntimeError, match="boom from FastAPI"):
        fastapi_app.invoke(make_inv(path="/boom"))


def test_fastapi_concurrent_invoke_async(fastapi_app: AsgiInvoker) -> None:
    async def main() -> list[dict[str, Any]]:
        return await asyncio.gather(
            *(fastapi_app.invoke_async(make_inv(path=f"/items/{i}")) for i in range(5))
        )

    assert [body_json(r)["item_id"] for r in asyncio.run(main())] == list(range(5))


def test_asgi_startup_then_fork_then_invoke_in_the_child() -> None:
    invoker = load(resolve_target(str(EXAMPLES / "fastapi_app" / "app.py")))
    invoker.startup()  # in the "snapshot"
    parent = os.getpid()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "worker"
        code = 1
        try:
            os.close(read_fd)
            invoker.after_fork()
            greeting = invoker.invoke(make_inv(path="/"))
            where = invoker.invoke(make_inv(path="/where"))
            # a sync route runs on a worker thread: the child's thread pool must work too
            price = invoker.invoke(make_inv(path="/prices/apple"))
            result = {
                "greeting": [greeting["status"], body_json(greeting)],
                "where": [where["status"], body_json(where)],
                "price": [price["status"], body_json(price)],
            }
            os.write(write_fd, json.dumps(result).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        data = b""
        deadline = time.monotonic() + 20
        while True:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([read_fd], [], [], max(0.0, remaining))
            if not ready:
                raise AssertionError("the forked worker did not answer within 20 s")
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            data += chunk
        _, status = os.waitpid(pid, 0)
        pid = 0
    finally:
        os.close(read_fd)
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    result = json.loads(data)
    # lifespan state made in the parent is there in the child, which serves from its own loop
    assert result["greeting"] == [200, {"message": "Hello from FastAPI", "started_in": parent}]
    assert result["where"][0] == 200
    assert result["where"][1]["pid"] not in (parent, 0)
    assert result["price"] == [200, {"name": "apple", "price": 3}]
    # the parent's loop still works: the child never touched the shared epoll instance
    assert body_json(invoker.invoke(make_inv(path="/where")))["pid"] == parent
    invoker.shutdown()


# -- ASGI: lifespan edge cases and protocol details ---------------------------------------------


def test_plain_asgi_app_without_lifespan_support() -> None:
    invoker = load(resolve_target(str(EXAMPLES / "asgi_plain")))
    assert isinstance(invoker, AsgiInvoker)
    invoker.startup()  # the app asserts scope type http: lifespan unsupported, not an error
    assert invoker.state is None
    response = invoker.invoke(make_inv(method="PUT", path="/a%20b", query="x=1", body=b"abc"))
    assert response["body"] == b"PUT /a b?x=1 (3 bytes)\n"


def test_plain_asgi_head_has_no_body() -> None:
    invoker = load(resolve_target(str(EXAMPLES / "asgi_plain")))
    response = invoker.invoke(make_inv(method="HEAD"))
    assert (response["status"], response["body"]) == (200, b"")
    assert header(response, "content-type") == ["text/plain; charset=utf-8"]


def _lifespan_app(on_startup: str) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            if on_startup == "return":
                return
            message = await receive()
            assert message["type"] == "lifespan.startup"
            if on_startup == "fail":
                await send({"type": "lifespan.startup.failed", "message": "db\nunreachable"})
                return
            if on_startup == "raise":
                raise ConnectionError("cannot reach the database")
            if on_startup == "hang":
                await asyncio.Event().wait()
            scope["state"]["counter"] = []
            await send({"type": "lifespan.startup.complete"})
            message = await receive()
            assert message["type"] == "lifespan.shutdown"
            await send({"type": "lifespan.shutdown.complete"})
            return
        scope["state"].setdefault("added", 0)
        scope["state"]["counter"].append(1)
        body = json.dumps({"keys": sorted(scope["state"]), "n": len(scope["state"]["counter"])})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body.encode()})

    return app


def test_lifespan_state_is_a_shallow_copy_per_request() -> None:
    invoker = AsgiInvoker(_lifespan_app("complete"), "app")
    invoker.startup()
    assert invoker.state == {"counter": []}
    first = body_json(invoker.invoke(make_inv()))
    second = body_json(invoker.invoke(make_inv()))
    # keys added by a request do not leak; shared objects are shared, as with uvicorn
    assert first == {"keys": ["added", "counter"], "n": 1}
    assert second == {"keys": ["added", "counter"], "n": 2}
    assert set(invoker.state) == {"counter"}
    invoker.shutdown()


def test_lifespan_startup_failed_raises_startup_error() -> None:
    invoker = AsgiInvoker(_lifespan_app("fail"), "app")
    with pytest.raises(StartupError, match="lifespan startup failed: db unreachable") as info:
        invoker.startup()
    assert "\n" not in str(info.value)


def test_lifespan_startup_exception_raises_startup_error() -> None:
    invoker = AsgiInvoker(_lifespan_app("raise"), "app")
    with pytest.raises(StartupError, match="ConnectionError: cannot reach the database") as info:
        invoker.startup()
    assert "Traceback" in info.value.details


def test_lifespan_startup_timeout() -> None:
    invoker = AsgiInvoker(_lifespan_app("hang"), "app", lifespan_timeout=0.2)
    with pytest.raises(StartupError, match=r"did not finish within 0\.2 s"):
        invoker.startup()


def test_app_that_returns_on_lifespan_is_served_without_state() -> None:
    invoker = AsgiInvoker(_lifespan_app("return"), "app")
    invoker.startup()
    assert invoker.state is None


def test_http_scope_follows_asgi_3() -> None:
    scope = build_scope(
        make_inv(
            method="POST",
            path="/caf%C3%A9/a%2Fb",
            root_path="/fn",
            query="q=%20x",
            headers=[["x-multi", "a"], ["x-multi", "b"]],
        ),
        state={"k": "v"},
    )
    assert scope == {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/fn/café/a/b",
        "raw_path": b"/fn/caf%C3%A9/a%2Fb",
        "query_string": b"q=%20x",
        "root_path": "/fn",
        "headers": [(b"host", b"localhost:8080"), (b"x-multi", b"a"), (b"x-multi", b"b")],
        "client": ("127.0.0.1", 51000),
        "server": ("127.0.0.1", 8080),
        "state": {"k": "v"},
    }
    assert "state" not in build_scope(make_inv())


def test_receive_gives_the_whole_body_then_waits_for_the_response() -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(await receive())
        pending = asyncio.ensure_future(receive())
        await asyncio.sleep(0)
        assert not pending.done()  # no disconnect while the response is still being written
        await send({"type": "http.response.start", "status": 200, "headers": [(b"a", b"b")]})
        await send({"type": "http.response.body", "body": b"one ", "more_body": True})
        await send({"type": "http.response.body", "body": b"two"})
        seen.append(await pending)

    response = AsgiInvoker(app, "app").invoke(make_inv(method="POST", body=b"payload"))
    assert response == {"status": 200, "headers": [["a", "b"]], "body": b"one two"}
    assert seen == [
        {"type": "http.request", "body": b"payload", "more_body": False},
        {"type": "http.disconnect"},
    ]


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], "without sending a response"),
        ([{"type": "http.response.body", "body": b"x"}], "before the start"),
        (
            [
                {"type": "http.response.start", "status": 200},
                {"type": "http.response.start", "status": 200},
            ],
            "twice",
        ),
        (
            [
                {"type": "http.response.start", "status": 200},
                {"type": "http.response.body", "body": b"x"},
                {"type": "http.response.body", "body": b"y"},
            ],
            "after the response was complete",
        ),
        ([{"type": "websocket.accept"}], "not an HTTP response message"),
    ],
)
def test_asgi_protocol_violations_are_errors(messages: list[dict[str, Any]], error: str) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        for message in messages:
            await send(message)

    with pytest.raises(RuntimeError, match=error):
        AsgiInvoker(app, "app").invoke(make_inv())


# -- a spare's warm-up walk ---------------------------------------------------------------------

_COUNTING = {
    "handler": """
        calls = []
        def handler(event, context):
            calls.append(context.aws_request_id)
            return {"statusCode": 200, "body": "mine"}
    """,
    "async handler": """
        calls = []
        async def handler(event, context):
            calls.append(context.aws_request_id)
            return {"statusCode": 200, "body": "mine"}
    """,
    "wsgi": """
        calls = []
        def app(environ, start_response):
            calls.append(environ["PATH_INFO"])
            start_response("200 OK", [("content-type", "text/plain")])
            return [b"mine"]
    """,
    "asgi": """
        calls = []
        async def app(scope, receive, send):
            if scope["type"] != "http":
                return
            calls.append(scope["path"])
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"mine"})
    """,
}


@pytest.mark.parametrize("kind", list(_COUNTING))
def test_a_spares_warm_up_walk_runs_the_adapter_but_never_the_function(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from hourai.isolate.worker import run_invocation, run_invocation_async, warm_up

    invoker = load_file(tmp_path, _COUNTING[kind], name=f"counting_{kind.replace(' ', '_')}.py")
    invoker.startup()
    module = sys.modules[f"counting_{kind.replace(' ', '_')}"]
    assert warm_up(invoker)  # the walk went through
    assert module.calls == []  # nothing of the tenant's ran
    assert capsys.readouterr().err == ""  # and the walk did not fail on the way
    inv = make_inv(path="/real", request_id="r-1")
    if invoker.is_async:
        reply = invoker.loop.run_until_complete(run_invocation_async(invoker, inv))
    else:
        reply = run_invocation(invoker, inv)
    assert reply["status"] == 200 and reply["body"] == b"mine"
    assert len(module.calls) == 1  # the real request, after it
