"""A minimal blocking HTTP/1.1 client for latency measurement.

http.client costs a few hundred microseconds per request in Python, which would swamp the
differences we measure; this one sends prebuilt bytes over a kept-alive socket and parses
just enough of the answer (status, content-length) to know where it ends.
"""

from __future__ import annotations

import socket
import time


class Client:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 60.0) -> None:
        self.addr = (host, port)
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._buf = b""

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.addr, timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._buf = b""
        return sock

    def get(self, path: str) -> tuple[int, dict[str, str], bytes, float]:
        """GET path: status, headers, body and the wall time in milliseconds."""
        sock = self.sock or self._connect()
        raw = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
        t0 = time.perf_counter()
        sock.sendall(raw)
        status, headers, body = self._read_response(sock)
        elapsed = (time.perf_counter() - t0) * 1000
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body, elapsed

    def _read_response(self, sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
        buf = self._buf
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection mid-body")
            rest += chunk
        self._buf = rest[length:]
        return status, headers, rest[:length]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
