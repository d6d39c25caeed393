"""The control API: JSON over HTTP on a unix socket, served by the ingress's HttpProtocol.

Routes (every body is JSON; every error is ``{"error": "..."}`` with a 4xx or 5xx status):

=======  ==================================  ===============================================
GET      /healthz                            ready (200) or starting/stopping (503)
GET      /metrics                            Prometheus text format
GET      /v1/functions                       every function, one summary each
GET      /v1/functions/NAME                  one function: versions, limits, state, stats
PUT      /v1/functions/NAME                  deploy {"path", "cwd", "options"}
DELETE   /v1/functions/NAME                  remove it
POST     /v1/functions/NAME/rollback         {"version": null | "..."}
POST     /v1/functions/NAME/invoke           {"method", "path", "query", "headers", "body"}
POST     /v1/functions/NAME/invocations      {"event": ..., "traceparent"?}: queue it (202,
                                             its id); its runs' traces link to the caller's
GET      /v1/functions/NAME/invocations      ?limit=N&status=S: recent async invocations
GET      /v1/functions/NAME/invocations/ID   one: status, attempts, result or error
POST     /v1/functions/NAME/debug            {"port": P}: a debugger's worker (hourai.debug)
DELETE   /v1/functions/NAME/debug            end its debug session
GET      /v1/functions/NAME/logs             ?lines=N | ?cursor=C&wait=S
GET      /v1/stats                           functions, tenants, host
POST     /v1/reload                          re-read the config file (like SIGHUP)
=======  ==================================  ===============================================

This module only maps HTTP to calls on an :class:`Operations` object (the daemon) and back;
nothing a client sends can reach past it as anything but an ApiError: malformed JSON, a
wrong type, an unknown route or method all get a 4xx, and an unexpected exception a 500
that is logged with its traceback while the daemon carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import re
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs

from hourai.ingress import HttpProtocol, Limits, Request, Response

log = logging.getLogger("hourai.control")

API_LIMITS = Limits(
    # An invocation's body (up to the ingress's 6 MiB) travels inside JSON, as base64 at worst.
    max_body_bytes=16 << 20,
    keep_alive_timeout=30.0,
    server_name="hourai-control",
)
MAX_LOG_WAIT = 30.0


class ApiError(Exception):
    """An answer other than success: ``status`` and a message, plus any extra fields."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra


class Operations(Protocol):
    """What the control API asks of the daemon."""

    def health(self) -> tuple[bool, dict[str, Any]]: ...
    async def render_metrics(self) -> tuple[bytes, str]: ...
    def list_functions(self) -> dict[str, Any]: ...
    def show(self, name: str) -> dict[str, Any]: ...
    async def deploy(self, name: str, body: dict[str, Any]) -> dict[str, Any]: ...
    async def remove(self, name: str) -> dict[str, Any]: ...
    async def rollback(self, name: str, version: str | None) -> dict[str, Any]: ...
    async def invoke(self, name: str, body: dict[str, Any]) -> dict[str, Any]: ...
    async def invoke_async(self, name: str, body: dict[str, Any]) -> dict[str, Any]: ...
    async def invocations_of(
        self, name: str, iid: str | None, limit: int, status: str | None
    ) -> dict[str, Any]: ...
    async def debug(self, name: str, port: int) -> dict[str, Any]: ...
    async def debug_stop(self, name: str) -> dict[str, Any]: ...
    async def logs(
        self, name: str, lines: int | None, cursor: str | None, wait: float
    ) -> dict[str, Any]: ...
    async def stats(self) -> dict[str, Any]: ...
    async def reload(self) -> dict[str, Any]: ...


def json_response(status: int, doc: Any) -> Response:
    body = json.dumps(doc, separators=(",", ":"), default=str).encode() + b"\n"
    return Response(status, [("content-type", "application/json")], body)


def error(status: int, message: str, **extra: Any) -> Response:
    return json_response(status, {"error": message, **extra})


Route = Callable[[Request, re.Match[str]], Awaitable[Response]]


class ControlAPI:
    def __init__(self, ops: Operations) -> None:
        self.ops = ops
        name = r"(?P<name>[^/]+)"
        self.routes: list[tuple[re.Pattern[str], dict[str, Route]]] = [
            (re.compile(r"/healthz"), {"GET": self._health}),
            (re.compile(r"/metrics"), {"GET": self._metrics}),
            (re.compile(r"/v1/functions/?"), {"GET": self._list}),
            (
                re.compile(rf"/v1/functions/{name}"),
                {"GET": self._show, "PUT": self._deploy, "DELETE": self._remove},
            ),
            (re.compile(rf"/v1/functions/{name}/rollback"), {"POST": self._rollback}),
            (re.compile(rf"/v1/functions/{name}/invoke"), {"POST": self._invoke}),
            (re.compile(rf"/v1/functions/{name}/logs"), {"GET": self._logs}),
            (
                re.compile(rf"/v1/functions/{name}/invocations"),
                {"GET": self._invocations, "POST": self._invoke_async},
            ),
            (
                re.compile(rf"/v1/functions/{name}/invocations/(?P<id>[0-9a-f]{{32}})"),
                {"GET": self._invocations},
            ),
            (
                re.compile(rf"/v1/functions/{name}/debug"),
                {"POST": self._debug, "DELETE": self._debug_stop},
            ),
            (re.compile(r"/v1/stats"), {"GET": self._stats}),
            (re.compile(r"/v1/reload"), {"POST": self._reload}),
        ]

    async def handle(self, request: Request) -> Response:
        """The HttpProtocol handler: route, call, answer JSON; never raises."""
        for pattern, methods in self.routes:
            m = pattern.fullmatch(request.path)
            if m is None:
                continue
            method = "GET" if request.method == "HEAD" else request.method
            route = methods.get(method)
            if route is None:
                allowed = ", ".join(sorted(methods))
                return error(
                    405, f"{request.method} is not allowed on {request.path} (use {allowed})"
                )
            try:
                return await route(request, m)
            except ApiError as exc:
                return error(exc.status, str(exc), **exc.extra)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("control API: %s %s failed", request.method, request.path)
                return error(500, "internal error (the daemon's log has the traceback)")
        return error(404, f"no such endpoint: {request.path}")

    async def public(self, request: Request) -> Response:
        """For the optional TCP metrics address: /metrics and /healthz only."""
        if request.path in ("/metrics", "/healthz"):
            return await self.handle(request)
        return error(404, "only /metrics and /healthz are served here")

    # -- routes

    async def _health(self, request: Request, m: re.Match[str]) -> Response:
        ok, doc = self.ops.health()
        return json_response(200 if ok else 503, doc)

    async def _metrics(self, request: Request, m: re.Match[str]) -> Response:
        body, content_type = await self.ops.render_metrics()
        return Response(200, [("content-type", content_type)], body)

    async def _list(self, request: Request, m: re.Match[str]) -> Response:
        return json_response(200, self.ops.list_functions())

    async def _show(self, request: Request, m: re.Match[str]) -> Response:
        return json_response(200, self.ops.show(m["name"]))

    async def _deploy(self, request: Request, m: re.Match[str]) -> Response:
        return json_response(200, await self.ops.deploy(m["name"], _body(request)))

    async def _remove(self, request: Request, m: re.Match[str]) -> Response:
        return json_response(200, await self.ops.remove(m["name"]))

    async def _rollback(self, request: Request, m: re.Match[str]) -> Response:
        body = _body(request, required=False)
        version = body.get("version")
        if version is not None and not isinstance(version, str):
            raise ApiError(400, "version must be a string or null")
        return json_response(200, await self.ops.rollback(m["name"], version))

    async def _invoke(self, request: Request, m: re.Match[str]) -> Response:
        return json_response(200, await self.ops.invoke(m["name"], _body(request)))

    async def _invoke_async(self, request: Request, m: re.Match[str]) -> Response:
        return json_response(202, await self.ops.invoke_async(m["name"], _body(request)))

    async def _invocations(self, request: Request, m: re.Match[str]) -> Response:
        query = parse_qs(request.query, keep_blank_values=True)
        limit = _int_param(query, "limit") or 50
        status = query.get("status", [None])[-1]
        iid = m.groupdict().get("id")
        return json_response(200, await self.ops.invocations_of(m["name"], iid, limit, status))
    async def _debug(self, request: Request, m: re.Match[str]) -> Response:
        port = _body(request, required=False).get("port", 5678)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ApiError(400, "port must be an integer from 0 to 65535")
        return json_response(200, await self.ops.debug(m["name"], port))

    async def _debug_stop(self, request: Request, m: re.Match[str]) -> Response:
        return json_response(200, await self.ops.debug_stop(m["name"]))

    async def _logs(self, request: Request, m: re.Match[str]) -> Response:
        query = parse_qs(request.query, keep_blank_values=True)
        lines = _int_param(query, "lines")
        cursor = query.get("cursor", [None])[-1]
        wait = _float_param(query, "wait") or 0.0
        wait = min(max(wait, 0.0), MAX_LOG_WAIT)
        return json_response(200, await self.ops.logs(m["name"], lines, cursor, wait))

    async def _stats(self, request: Request, m: re.Match[str]) -> Response:
        return json_response(200, await self.ops.stats())

    async def _reload(self, request: Request, m: re.Match[str]) -> Response:
        return json_response(200, await self.ops.reload())


def _body(request: Request, *, required: bool = True) -> dict[str, Any]:
    if not request.body.strip():
        if required:
            raise ApiError(400, "this request needs a JSON object as its body")
        return {}
    try:
        doc = json.loads(request.body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "the body must be a JSON object")
    return doc


def _int_param(query: dict[str, list[str]], key: str) -> int | None:
    if key not in query:
        return None
    try:
        value = int(query[key][-1])
    except ValueError:
        raise ApiError(400, f"{key} must be an integer") from None
    if value < 0:
        raise ApiError(400, f"{key} must not be negative")
    return value


def _float_param(query: dict[str, list[str]], key: str) -> float | None:
    if key not in query:
        return None
    try:
        return float(query[key][-1])
    except ValueError:
        raise ApiError(400, f"{key} must be a number") from None


# ---------------------------------------------------------------------- the unix socket


class SocketInUse(Exception):
    """Another daemon answers on the control socket."""


class ControlServer:
    """The listening unix socket: born with its final mode, removed at close."""

    def __init__(self, handler: Callable[[Request], Awaitable[Response]], path: Path) -> None:
        self.handler = handler
        self.path = path
        self.server: asyncio.base_events.Server | None = None
        self.connections: set[HttpProtocol] = set()

    async def start(self, group: str = "") -> None:
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        _clear_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # umask, not chmod after bind: there must be no moment where others may connect.
        old = os.umask(0o177 if not group else 0o117)
        try:
            sock.bind(str(path))
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old)
        if group:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
            os.chmod(path, 0o660)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_unix_server(
            lambda: HttpProtocol(self.handler, API_LIMITS, connections=self.connections),
            sock=sock,
            backlog=256,
        )

    async def close(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for conn in list(self.connections):
            conn.shutdown()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.server = None


def _clear_stale(path: Path) -> None:
    """Remove a socket file that nobody listens on (left by a crash); refuse to take over
    one that answers."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketInUse(f"{path} exists and is not a socket; remove it or set another socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    except OSError as exc:
        raise SocketInUse(f"cannot take over {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise SocketInUse(f"another hourai daemon is answering on {path}")
