"""A minimal blocking HTTP/1.1 client for latency measurement.

http.client costs a few hundred microseconds per request in Python, which would swamp the
differences we measure; this one sends prebuilt bytes over a kept-alive socket and parses
just enough of the answer (status, content-length) to know where it ends.
"""

from __future__ import annotations

import select
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


def _parse(buf: bytes) -> tuple[int, dict[str, str]] | None:
    """Status and headers of a complete response in ``buf``, or None while it is not."""
    head, sep, rest = buf.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if len(rest) < int(headers.get("content-length", "0")):
        return None
    return int(lines[0].split(" ", 2)[1]), headers


def burst(
    port: int,
    n: int,
    path: str = "/",
    host: str = "127.0.0.1",
    timeout: float = 60.0,
    settle: float = 0.05,
) -> tuple[list[tuple[int, dict[str, str], float]], float]:
    """GET ``path`` on ``n`` connections at once, from one thread: each request's status,
    headers and milliseconds from its own send, and the milliseconds until all were answered.

    The connections are open, and ``settle`` seconds old (the server has accepted them),
    before the first request goes: the burst is the requests, not the handshakes. One
    thread with epoll, not a
    thread per request: 200 threads taking turns at one interpreter's lock would add tens
    of milliseconds of their own to the latencies (against bench/rawserver.py, 200 requests
    took 47-63 ms from threads, most of it the client's)."""
    socks = []
    for _ in range(n):
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        socks.append(sock)
    time.sleep(settle)
    raw = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    ep = select.epoll()
    sent: dict[int, float] = {}
    bufs: dict[int, bytes] = {}
    results: list[tuple[int, dict[str, str], float]] = []
    try:
        t0 = time.perf_counter()
        for sock in socks:
            fd = sock.fileno()
            sent[fd] = time.perf_counter()
            sock.send(raw)  # a few dozen bytes into an empty socket buffer: all of it goes
            bufs[fd] = b""
            ep.register(fd, select.EPOLLIN)
        by_fd = {sock.fileno(): sock for sock in socks}
        deadline = t0 + timeout
        while len(results) < n:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError(f"{n - len(results)} of {n} requests unanswered")
            for fd, _ in ep.poll(left):
                chunk = by_fd[fd].recv(65536)
                now = time.perf_counter()
                if not chunk:
                    raise ConnectionError("server closed a connection before answering")
                bufs[fd] += chunk
                parsed = _parse(bufs[fd])
                if parsed is not None:
                    ep.unregister(fd)
                    results.append((parsed[0], parsed[1], (now - sent[fd]) * 1000))
        total = (time.perf_counter() - t0) * 1000
    finally:
        ep.close()
        for sock in socks:
            sock.close()
    return results, total
