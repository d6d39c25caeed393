"""A function whose module-level code, run in its snapshot, writes on the snapshot's channel
to the daemon (the one unix stream socket among the snapshot's fds), as a hostile tenant
could: a frame no snapshot may send."""

import os
import socket
import stat
import struct
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


# a "ready" of a kind the daemon does not know, then a "forked" that claims fds it lacks
_channel().sendall(
    _frame({"t": "ready", "kind": "root-shell", "attr": "x", "init_ms": 0, "pid": 1})
    + _frame({"t": "forked", "wid": 1, "pid": 1})
)
time.sleep(30)


def handler(event, context):
    return "never reached"
