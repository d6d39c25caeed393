"""A client of the control API: stdlib http.client over the daemon's unix socket.

Kept free of the daemon's imports, so ``hourai ls`` starts as fast as Python does.
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any
from urllib.parse import quote

# Deploys build a snapshot and invocations run a function: both may take a while.
LONG_TIMEOUT = 600.0
TIMEOUT = 60.0


class ClientError(Exception):
    """The daemon could not be reached (exit status 3)."""


class ApiFailure(Exception):
    """The daemon answered with an error; ``doc`` is its JSON answer."""

    def __init__(self, status: int, doc: dict[str, Any]) -> None:
        super().__init__(str(doc.get("error") or f"HTTP {status}"))
        self.status = status
        self.doc = doc


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Client:
    def __init__(self, socket_path: Path | str) -> None:
        self.socket_path = str(socket_path)

    def raw(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        timeout: float = TIMEOUT,
        data: bytes | None = None,
    ) -> tuple[int, str, bytes]:
        """(status, content type, body) of one request; ClientError if there is no daemon.
        ``body`` is sent as JSON; ``data`` as it is."""
        conn = _UnixConnection(self.socket_path, timeout)
        payload = data if data is not None else None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if payload is not None else {}
        try:
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.getheader("content-type", ""), resp.read()
        except FileNotFoundError:
            raise ClientError(
                f"no hourai daemon at {self.socket_path}: the socket does not exist (start "
                "one with `hourai daemon`, or point at it with --socket or HOURAI_SOCKET)"
            ) from None
        except ConnectionRefusedError:
            raise ClientError(
                f"no hourai daemon at {self.socket_path}: nothing listens there (it stopped; "
                "start it with `hourai daemon`)"
            ) from None
        except PermissionError:
            raise ClientError(
                f"not allowed to use {self.socket_path}: the control socket is for root (and "
                "the configured socket_group)"
            ) from None
        except TimeoutError:
            raise ClientError(
                f"the hourai daemon at {self.socket_path} did not answer within {timeout:g}s"
            ) from None
        except (http.client.HTTPException, ConnectionError) as exc:
            raise ClientError(f"lost the connection to the hourai daemon: {exc}") from None
        except OSError as exc:
            raise ClientError(
                f"cannot reach the hourai daemon at {self.socket_path}: {exc}"
            ) from None
        finally:
            conn.close()

    def call(
        self, method: str, path: str, body: Any = None, *, timeout: float = TIMEOUT
    ) -> dict[str, Any]:
        """The JSON answer of a request; ApiFailure for an error status."""
        status, _ctype, data = self.raw(method, path, body, timeout=timeout)
        try:
            doc = json.loads(data) if data else {}
        except ValueError:
            doc = {"error": data.decode("utf-8", "replace").strip() or f"HTTP {status}"}
        if not isinstance(doc, dict):
            doc = {"value": doc}
        if status >= 400:
            raise ApiFailure(status, doc)
        return doc

    # -- the operations, one per command

    def deploy(self, name: str, path: str, cwd: str, options: dict[str, Any]) -> dict[str, Any]:
        body = {"path": path, "cwd": cwd, "options": options}
        return self.call("PUT", f"/v1/functions/{quote(name, safe='')}", body, timeout=LONG_TIMEOUT)

    def functions(self) -> dict[str, Any]:
        return self.call("GET", "/v1/functions")

    def show(self, name: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/functions/{quote(name, safe='')}")

    def remove(self, name: str) -> dict[str, Any]:
        return self.call("DELETE", f"/v1/functions/{quote(name, safe='')}", timeout=LONG_TIMEOUT)

    def rollback(self, name: str, version: str | None) -> dict[str, Any]:
        return self.call(
            "POST",
            f"/v1/functions/{quote(name, safe='')}/rollback",
            {"version": version},
            timeout=LONG_TIMEOUT,
        )

    def debug(self, name: str, port: int) -> dict[str, Any]:
        return self.call(
            "POST", f"/v1/functions/{quote(name, safe='')}/debug", {"port": port}, timeout=60
        )

    def debug_stop(self, name: str) -> dict[str, Any]:
        return self.call("DELETE", f"/v1/functions/{quote(name, safe='')}/debug")

    def invoke(self, name: str, request: dict[str, Any]) -> dict[str, Any]:
        return self.call(
            "POST", f"/v1/functions/{quote(name, safe='')}/invoke", request, timeout=LONG_TIMEOUT
        )

    def invoke_async(self, name: str, event: Any, traceparent: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"event": event}
        if traceparent is not None:
            body["traceparent"] = traceparent
        return self.call("POST", f"/v1/functions/{quote(name, safe='')}/invocations", body)

    def invocations(
        self, name: str, iid: str | None = None, *, limit: int = 50, status: str | None = None
    ) -> dict[str, Any]:
        path = f"/v1/functions/{quote(name, safe='')}/invocations"
        if iid is not None:
            return self.call("GET", f"{path}/{quote(iid, safe='')}")
        query = f"?limit={limit}" + (f"&status={quote(status)}" if status else "")
        return self.call("GET", path + query)

    def logs(
        self, name: str, *, lines: int | None = None, cursor: str | None = None, wait: float = 0
    ) -> dict[str, Any]:
        query = []
        if lines is not None:
            query.append(f"lines={lines}")
        if cursor is not None:
            query.append(f"cursor={quote(cursor)}")
        if wait:
            query.append(f"wait={wait:g}")
        path = f"/v1/functions/{quote(name, safe='')}/logs" + (
            "?" + "&".join(query) if query else ""
        )
        return self.call("GET", path, timeout=TIMEOUT + wait)

    def stats(self) -> dict[str, Any]:
        return self.call("GET", "/v1/stats")

    def health(self) -> tuple[int, dict[str, Any]]:
        status, _ctype, data = self.raw("GET", "/healthz")
        return status, json.loads(data)

    def metrics(self) -> str:
        status, _ctype, data = self.raw("GET", "/metrics")
        if status != 200:
            raise ApiFailure(status, {"error": data.decode("utf-8", "replace")})
        return data.decode()
