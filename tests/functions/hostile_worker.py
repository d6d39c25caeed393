"""A function that abuses its worker's channel and output, chosen by the request path.

Function code can reach the worker's channel: it is the one unix stream socket among the
process's fds. Everything here writes on it directly, as a hostile tenant could.
"""

import os
import socket
import stat
import struct
import sys
import time

import msgpack


def _channel() -> socket.socket:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM:
            return sock
        sock.close()
    raise RuntimeError("no channel found")


def _frame(msg: dict) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def _rid(context) -> int:
    # request_id is "<request id in hex>-<worker pid>"
    return int(context.aws_request_id.split("-", 1)[0], 16)


def handler(event, context):
    path = event["rawPath"]
    params = event.get("queryStringParameters") or {}
    seconds = float(params.get("s", "5"))
    if path.endswith("/flood-valid"):
        # well-formed answers to requests nobody made, as fast as the socket takes them
        chan = _channel()
        frame = _frame({"t": "res", "id": 10**9, "status": 200, "headers": [], "body": b"x"})
        burst = frame * 512
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            chan.sendall(burst)
        return "flooded"
    if path.endswith("/flood-junk"):
        chan = _channel()
        junk = b"\x00\x00\x00\x05\x92\x01\x02\x03\x04" * 4096
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            chan.sendall(junk)
        return "flooded"
    if path.endswith("/bad-status"):
        _channel().sendall(
            _frame({"t": "res", "id": _rid(context), "status": "200", "headers": [], "body": b""})
        )
        time.sleep(seconds)
        return "too late"
    if path.endswith("/bad-headers"):
        _channel().sendall(
            _frame({"t": "res", "id": _rid(context), "status": 200, "headers": 7, "body": b""})
        )
        time.sleep(seconds)
        return "too late"
    if path.endswith("/missing-body"):
        _channel().sendall(_frame({"t": "res", "id": _rid(context), "status": 200}))
        time.sleep(seconds)
        return "too late"
    if path.endswith("/unknown-id"):
        _channel().sendall(
            _frame(
                {"t": "res", "id": _rid(context) + 1000, "status": 200, "headers": [], "body": b""}
            )
        )
        time.sleep(seconds)
        return "too late"
    if "/stream-" in path:
        # streaming frames out of order (tests/test_streaming.py)
        rid, chan = _rid(context), _channel()
        head = {"t": "res", "id": rid, "status": 200, "headers": [], "body": b"head\n"}
        frames = {
            "/stream-chunk-unasked": [{"t": "chunk", "id": rid, "body": b"x", "more": True}],
            "/stream-chunk-bad-more": [{"t": "chunk", "id": rid, "body": b"x", "more": "yes"}],
            "/stream-more-false": [{**head, "more": False}],
            "/stream-res-twice": [{**head, "more": True}, head],
            "/stream-chunk-after-end": [
                {**head, "more": True},
                {"t": "chunk", "id": rid, "body": b"end\n", "more": False},
                {"t": "chunk", "id": rid, "body": b"more", "more": True},
            ],
            "/stream-chunk-oversized": [
                {**head, "more": True},
                {"t": "chunk", "id": rid, "body": b"x" * (400 << 10), "more": True},
            ],
        }[path[path.index("/stream-") :]]
        for frame in frames:
            chan.sendall(_frame(frame))
        time.sleep(seconds)
        return "too late"
    if path.endswith("/answer-next"):
        # answer the request sent ahead (the next id) before this one, which it has not run
        time.sleep(seconds)
        frame = {"t": "res", "id": _rid(context) + 1, "status": 200, "headers": [], "body": b"!"}
        _channel().sendall(_frame(frame))
        time.sleep(seconds)
        return "answered out of turn"
    if path.endswith("/unknown-type"):
        _channel().sendall(_frame({"t": "inv", "id": _rid(context)}))
        time.sleep(seconds)
        return "too late"
    if path.endswith("/huge-declared"):
        # a length prefix of 2 GiB, then nothing: the daemon must not wait for the body
        _channel().sendall(struct.pack(">I", 2**31) + b"\x81")
        time.sleep(seconds)
        return "too late"
    if path.endswith("/big"):
        size = int(float(params.get("mb", "60")) * (1 << 20))
        return {"statusCode": 200, "body": "x" * size}
    if path.endswith("/print"):
        size = int(float(params.get("mb", "50")) * (1 << 20))
        line = "y" * 99 + "\n"
        out = sys.stdout
        for _ in range(size // 100):
            out.write(line)
        out.flush()
        return "printed"
    if path.endswith("/print-line"):
        size = int(float(params.get("mb", "50")) * (1 << 20))
        sys.stdout.write("z" * size + "\n")
        sys.stdout.flush()
        return "printed"
    return "hostile but quiet"
