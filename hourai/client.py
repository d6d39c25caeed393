"""The CLI's side of the control API: JSON over HTTP on the daemon's unix socket."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any


class DaemonUnreachable(Exception):
    """No daemon answers on the socket; the message says how to start one."""


class ApiFailure(Exception):
    def __init__(self, status: int, doc: dict[str, Any]) -> None:
        super().__init__(doc.get("error", f"HTTP {status}"))
        self.status = status
        self.doc = doc


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.path))
        self.sock = sock


class Client:
    def __init__(self, socket_path: Path, timeout: float = 300.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """The JSON answer of a 2xx; ApiFailure for any other status."""
        status, raw = self.raw(method, path, body)
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = {"error": raw.decode("utf-8", "replace")}
        if not 200 <= status < 300:
            raise ApiFailure(status, doc)
        return doc

    def raw(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        conn = _UnixConnection(self.socket_path, self.timeout)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"content-type": "application/json"} if data is not None else {}
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonUnreachable(
                f"no hourai daemon at {self.socket_path} ({exc.strerror}); start one with "
                "`hourai daemon` (or `systemctl start hourai`), or point --socket / "
                "HOURAI_SOCKET at its control socket"
            ) from None
        except PermissionError:
            raise DaemonUnreachable(
                f"permission denied on {self.socket_path}: the control socket is root's"
            ) from None
        finally:
            conn.close()
