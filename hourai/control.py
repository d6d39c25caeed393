"""The control API: JSON over HTTP on the daemon's unix socket (what the CLI talks to).

It reuses the ingress's HTTP parser and limits. Every route answers JSON; a malformed
request gets a 4xx with ``{"error": ...}``; an unexpected failure is logged and answered
500, and never reaches the event loop.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from hourai.ingress import Request, Response

if TYPE_CHECKING:
    from hourai.service import Daemon

log = logging.getLogger("hourai.control")


class ApiError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra


def reply(status: int, doc: Any) -> Response:
    body = json.dumps(doc, default=str).encode() + b"\n"
    return Response(status, [("content-type", "application/json")], body)


_ROUTES = [
    ("GET", re.compile(r"/healthz"), "healthz"),
    ("GET", re.compile(r"/metrics"), "metrics"),
    ("GET", re.compile(r"/stats"), "stats"),
    ("GET", re.compile(r"/functions"), "list"),
    ("POST", re.compile(r"/functions"), "deploy"),
    ("GET", re.compile(r"/functions/(?P<name>[^/]+)"), "show"),
    ("DELETE", re.compile(r"/functions/(?P<name>[^/]+)"), "remove"),
    ("POST", re.compile(r"/functions/(?P<name>[^/]+)/invoke"), "invoke"),
    ("POST", re.compile(r"/functions/(?P<name>[^/]+)/rollback"), "rollback"),
    ("GET", re.compile(r"/logs/(?P<name>[^/]+)"), "logs"),
]


class ControlAPI:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def handle(self, request: Request) -> Response:
        try:
            for method, pattern, action in _ROUTES:
                m = pattern.fullmatch(request.path)
                if m is None:
                    continue
                if request.method != method:
                    continue
                return await getattr(self, action)(request, **m.groupdict())
            if any(p.fullmatch(request.path) for _, p, _ in _ROUTES):
                raise ApiError(405, f"{request.method} not allowed on {request.path}")
            raise ApiError(404, f"no such endpoint {request.path}")
        except ApiError as exc:
            return reply(exc.status, {"error": str(exc), **exc.extra})
        except Exception as exc:
            log.exception("control request %s %s failed", request.method, request.path)
            return reply(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})

    # --------------------------------------------------------------------- routes

    async def healthz(self, request: Request) -> Response:
        d = self.daemon
        return reply(200, {"ok": True, "ready": d.ready, "functions": len(d.runtime.functions)})

    async def metrics(self, request: Request) -> Response:
        return Response(
            200,
            [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
            self.daemon.metrics.render(),
        )

    async def stats(self, request: Request) -> Response:
        return reply(200, self.daemon.stats())

    async def list(self, request: Request) -> Response:
        return reply(200, {"functions": self.daemon.list_functions()})

    async def show(self, request: Request, name: str) -> Response:
        return reply(200, self.daemon.show(self._known(name)))

    async def deploy(self, request: Request) -> Response:
        body = _json(request)
        if not isinstance(body.get("name"), str) or not isinstance(body.get("path"), str):
            raise ApiError(400, "deploy needs 'name' and 'path' (strings)")
        return reply(200, await self.daemon.deploy(body))

    async def remove(self, request: Request, name: str) -> Response:
        self.daemon.remove(self._known(name))
        return reply(200, {"removed": name})

    async def invoke(self, request: Request, name: str) -> Response:
        spec = self.daemon.runtime.functions.get(self._known(name))
        assert spec is not None
        body = _json(request) if request.body else {}
        payload = body.get("body", "")
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        fake = Request(
            body.get("method", "POST" if data else "GET"),
            body.get("path", "/"),
            body.get("path", "/"),
            "",
            [("content-type", "application/json")] if data else [],
            data,
            "1.1",
            ("control", 0),
            ("control", 0),
            True,
        )
        result = await self.daemon.runtime.invoke(spec, fake, "", fake.path)
        try:
            text: str | None = result.body.decode()
        except UnicodeDecodeError:
            text = None
        return reply(
            200,
            {
                "status": result.status,
                "headers": dict(result.headers),
                "body": text if text is not None else base64.b64encode(result.body).decode(),
                "isBase64Encoded": text is None,
            },
        )

    async def rollback(self, request: Request, name: str) -> Response:
        body = _json(request) if request.body else {}
        return reply(200, await self.daemon.rollback(self._known(name), body.get("version")))

    async def logs(self, request: Request, name: str) -> Response:
        params = parse_qs(request.query)
        try:
            offset = int(params.get("offset", ["0"])[0])
        except ValueError:
            raise ApiError(400, "offset must be an integer") from None
        text, next_offset = self.daemon.function_logs.read(name, offset)
        return reply(200, {"text": text, "offset": next_offset})

    def _known(self, name: str) -> str:
        if name not in self.daemon.registry.functions:
            raise ApiError(404, f"no function named {name!r} is deployed")
        return name


def _json(request: Request) -> dict[str, Any]:
    try:
        doc = json.loads(request.body or b"{}")
    except ValueError as exc:
        raise ApiError(400, f"request body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "request body must be a JSON object")
    return doc
